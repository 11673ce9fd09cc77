"""A rule file rewritten in place, slowly, while streams run: no stream is guarded by a partial file.

The file is truncated and written back a byte at a time over about two seconds (what a deploy
tool or an editor writing in place does). Fifty streams start during that time; every one must
end as the complete rules say: the SSN and the code name redacted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import httpx
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from guardrail.proxy.app import ServeSettings, build_app
from tests.apps import ChatChunks
from tests.servers import serve_in_thread

RULES = """version: 1
paths: ["/v1/*"]
rules:
  - name: pii
    type: banned_patterns
    patterns: ['\\d{3}-\\d{2}-\\d{4}']
    action: redact
  - name: codename
    type: banned_patterns
    phrases: ["project starlight"]
    action: redact
"""
STREAMS = 50
REWRITE_SECONDS = 2.0


async def answer(request: Request) -> StreamingResponse:
    await request.body()

    async def body() -> AsyncIterator[bytes]:
        for event in ChatChunks().stream(["SSN 123-45-", "6789 and Project ", "Starlight."]):
            await anyio.sleep(0.01)
            yield event

    return StreamingResponse(body(), media_type="text/event-stream")


def rewrite_slowly(path: Path, done: threading.Event) -> None:
    data = RULES.encode()
    pause = REWRITE_SECONDS / len(data)
    with open(path, "r+b") as file:
        file.truncate(0)
        for position in range(len(data)):
            file.seek(position)
            file.write(data[position : position + 1])
            file.flush()
            time.sleep(pause)
    done.set()


def test_streams_during_an_in_place_rewrite_are_guarded_by_complete_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    model = Starlette(routes=[Route("/v1/chat/completions", answer, methods=["POST"])])
    app = build_app(ServeSettings((str(rules),)), registry=CollectorRegistry(), model=model, poll_seconds=0.05)
    done = threading.Event()
    with serve_in_thread(app) as base_url:
        writer = threading.Thread(target=rewrite_slowly, args=(rules, done))
        writer.start()

        def one_stream(number: int) -> str:
            time.sleep(number * REWRITE_SECONDS / STREAMS)
            body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=20).text

        with ThreadPoolExecutor(max_workers=STREAMS) as pool:
            answers = list(pool.map(one_stream, range(STREAMS)))
        writer.join()
        assert done.is_set()
        time.sleep(1)  # the file has settled: the rules in force are the complete ones again
        answers.append(one_stream(0))
    for text in answers:
        assert "6789" not in text, text
        assert "Starlight" not in text, text
        assert text.count("[redacted]") == 2, text
