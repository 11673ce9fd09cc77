"""Bad input behind a real server, seen by the official openai SDK: an in-stream error, never a hang or a cut body."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import openai
import pytest
from fastapi import FastAPI
from starlette.responses import StreamingResponse

from guardrail import GuardrailMiddleware
from tests.apps import CHAT_PATH, ChatChunks
from tests.servers import serve_in_thread

CHUNKS = ChatChunks()

# '(a|aa)+b' backtracks exponentially on a long run of "a" with no "b": the search must be cut off.
HOSTILE_RULES = """\
version: 1
paths: ["/v1/*"]
rules:
  - name: hostile
    type: banned_patterns
    patterns: ['(a|aa)+b']
    action: abort
"""


def app_streaming(bodies: list[bytes], closed: threading.Event, rules: Path) -> FastAPI:
    async def answer() -> AsyncIterator[bytes]:
        try:
            for body in bodies:
                await anyio.sleep(0)
                yield body
            while True:  # a model that would go on forever: only the guard can stop it
                await anyio.sleep(0.05)
                yield CHUNKS.content(" more")
        finally:
            closed.set()

    app = FastAPI()

    @app.post(CHAT_PATH)
    async def completions() -> StreamingResponse:
        return StreamingResponse(answer(), media_type="text/event-stream")

    app.add_middleware(GuardrailMiddleware, rules=str(rules))
    return app


def stream_until_error(base_url: str) -> tuple[str, openai.APIError | None]:
    text = ""
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="test", max_retries=0, timeout=30) as client:
        try:
            with client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Hi"}], stream=True
            ) as stream:
                for chunk in stream:
                    text += "".join(choice.delta.content or "" for choice in chunk.choices)
        except openai.APIError as exc:
            return text, exc
    return text, None


@pytest.mark.parametrize(
    ("bodies", "code"),
    [
        ([CHUNKS.role(), CHUNKS.content("Fine so far. "), CHUNKS.content("a" * 40 + "!")], "rule_error"),
        ([CHUNKS.role(), CHUNKS.content("Fine so far. "), b"data: {not json\n\n"], "malformed_event"),
        ([CHUNKS.role(), CHUNKS.content("Fine so far. "), b"data: " + b"x" * (1 << 20) + b"\n\n"], "event_too_large"),
    ],
    ids=["hostile-pattern", "malformed-json", "oversized-event"],
)
def test_bad_input_ends_the_stream_with_an_error_the_sdk_raises_and_stops_the_app(
    tmp_path: Path, bodies: list[bytes], code: str
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(HOSTILE_RULES, encoding="utf-8")
    closed = threading.Event()
    with serve_in_thread(app_streaming(bodies, closed, rules)) as base_url:
        text, error = stream_until_error(base_url)
        assert closed.wait(10), "the app went on after the stream was ended"
    assert text == "Fine so far. "
    assert error is not None and not isinstance(error, openai.APIConnectionError), error
    assert getattr(error, "code", None) == code
