"""The Vercel AI SDK's UI message stream through the middleware and a real server.

Read twice: by a parser of the protocol (wire-formats §6.2) that also checks every byte, and,
where Node is on the machine, by the ``ai`` package itself, as ``useChat`` reads it (installed
from the registry into a cache folder on first use; skipped, with the reason, without Node).
The app serves ``/api/chat``, the path useChat posts to by default and also Ollama's: the
response header names the dialect.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from starlette.responses import Response, StreamingResponse

from guardrail.asgi import GuardrailMiddleware
from guardrail.config import RuleSet
from guardrail.config.ruleset import RuleGroup
from guardrail.core.rule import Action, BoundRule, Fallback
from guardrail.rules.banned import BannedPatterns
from guardrail.rules.budget import TokenBudget
from guardrail.rules.timeout import IdleTimeout
from guardrail.tokenizers import get_encoding
from tests.servers import serve_in_thread

KEY = "sk-" + "Zq9Xw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe"
DELTAS = ["Your key is ", KEY[:10], KEY[10:], " and the codename is Project", " Starlight, ok."]
THOUGHT = ["Let me think about", " what to say."]
SORRY = "Sorry, I can't share that."
EXPECTED = {
    Action.REDACT: ("Your key is [redacted] and the codename is [redacted], ok.", "stop"),
    Action.ABORT: ("Your key is ", "content-filter"),
    Action.FALLBACK: ("Your key is \n\n" + SORRY, "stop"),
    "budget": ("Your key is", "length"),
}
HEADERS = {"x-vercel-ai-ui-message-stream": "v1", "cache-control": "no-cache"}
NODE_SCRIPT = Path(__file__).parent / "node" / "ui_chat.mjs"
AI_PACKAGE = "ai@6"  # the newest major that runs on Node 20 (ai 7 needs Node 22)


def parts(thought: bool) -> list[dict[str, Any]]:
    reasoning = [
        {"type": "reasoning-start", "id": "r1"},
        *({"type": "reasoning-delta", "id": "r1", "delta": d} for d in THOUGHT),
        {"type": "reasoning-end", "id": "r1"},
    ]
    return [
        {"type": "start", "messageId": "msg-1"},
        {"type": "start-step"},
        *(reasoning if thought else []),
        {"type": "text-start", "id": "t1"},
        *({"type": "text-delta", "id": "t1", "delta": d} for d in DELTAS),
        {"type": "text-end", "id": "t1"},
        {"type": "finish-step"},
        {"type": "finish"},
    ]


def app(action: Action | str) -> FastAPI:
    api = FastAPI()
    thought = isinstance(action, Action)

    @api.post("/api/chat")
    async def chat() -> Response:
        async def body() -> AsyncIterator[bytes]:
            for part in parts(thought):
                yield f"data: {json.dumps(part)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers=HEADERS)

    if not isinstance(action, Action):
        rule = BoundRule("budget", TokenBudget(get_encoding("o200k_base"), max_tokens=3), Action.ABORT)
    else:
        banned = BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"], phrases=["project starlight"])
        fallback = Fallback("sorry", text=SORRY) if action is Action.FALLBACK else None
        rule = BoundRule("secrets", banned, action, fallback=fallback)
    group = RuleGroup("", ("/api/*",), "o200k_base", (rule,), final_answer_only=((), False))
    api.add_middleware(GuardrailMiddleware, rules=RuleSet((group,)))
    return api


@pytest.fixture(scope="module", params=[Action.REDACT, Action.ABORT, Action.FALLBACK, "budget"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, Action | str]]:
    with serve_in_thread(app(request.param)) as base_url:
        yield base_url, request.param


def read_parts(body: bytes) -> list[Any]:
    """The stream's parts, read by the protocol: data-only events, then ``[DONE]``."""
    out: list[Any] = []
    for event in body.decode().split("\n\n"):
        if not event:
            continue
        assert event.startswith("data: ") and "\n" not in event, event
        data = event.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_the_stream_is_guarded_part_by_part(served: tuple[str, Action | str]) -> None:
    base_url, action = served
    response = httpx.post(f"{base_url}/api/chat", json={"messages": []})
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert KEY[:10] not in response.text and "Starlight" not in response.text
    read = read_parts(response.content)
    assert read[-1] == "[DONE]"
    text = "".join(p["delta"] for p in read[:-1] if p["type"] == "text-delta")
    assert text == EXPECTED[action][0]
    assert not any(p["type"].startswith("reasoning-") for p in read[:-1])  # final answer only: no trace of it
    finish = [p for p in read[:-1] if p["type"] == "finish"]
    assert len(finish) == 1 and finish[0].get("finishReason", "stop") == EXPECTED[action][1]
    # Every text part that starts ends, before the step and the message finish.
    types = [p["type"] for p in read[:-1]]
    assert types.count("text-start") == types.count("text-end")
    assert types.index("finish-step") < types.index("finish") == len(types) - 1


@pytest.fixture(scope="session")
def ai_sdk() -> Path:
    """A folder with the ``ai`` package installed and the reader script, or a skip saying why not."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node and npm are not on this machine: the ai package's reader cannot run")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "guardrail-tests" / AI_PACKAGE
    if not (cache / "node_modules" / "ai" / "package.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "package.json").write_text('{"private": true, "type": "module"}\n')
        install = [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", AI_PACKAGE]
        done = subprocess.run(install, cwd=cache, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.skip(f"npm could not install {AI_PACKAGE}: {done.stderr.strip()[-300:]}")
    shutil.copy(NODE_SCRIPT, cache / NODE_SCRIPT.name)
    return cache


def read_with_ai(folder: Path, url: str) -> dict[str, Any]:
    done = subprocess.run(
        ["node", NODE_SCRIPT.name, url], cwd=folder, capture_output=True, text=True, timeout=60, check=True
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_ai_sdk_reads_the_guarded_stream_as_use_chat_does(served: tuple[str, Action | str], ai_sdk: Path) -> None:
    base_url, action = served
    seen = read_with_ai(ai_sdk, f"{base_url}/api/chat")
    assert seen["errors"] == []
    assert seen["text"] == EXPECTED[action][0]
    assert seen["reasoning"] == ""
    assert (seen["finishReason"] or "stop") == EXPECTED[action][1]


def test_an_error_ending_reaches_use_chat_with_the_code(ai_sdk: Path) -> None:
    api = FastAPI()

    @api.post("/chat")
    async def chat() -> Response:
        async def body() -> AsyncIterator[bytes]:
            for part in parts(False)[:5]:
                yield f"data: {json.dumps(part)}\n\n".encode()
            await anyio.sleep(30)

        return StreamingResponse(body(), media_type="text/event-stream", headers=HEADERS)

    rule = BoundRule("idle", IdleTimeout(0.3), Action.ABORT)
    api.add_middleware(GuardrailMiddleware, rules=RuleSet.from_rules([rule]))
    with serve_in_thread(api) as base_url:
        seen = read_with_ai(ai_sdk, f"{base_url}/chat")
    assert seen["text"] == "Your key is " + KEY[:10]
    assert len(seen["errors"]) == 1 and seen["errors"][0].startswith("idle_timeout: ")
    assert seen["types"][-2:] == ["text-delta", "error"]


def test_banned_reasoning_stops_the_stream_before_the_answer_and_closes_its_part() -> None:
    api = FastAPI()

    @api.post("/chat")
    async def chat() -> Response:
        async def body() -> AsyncIterator[bytes]:
            for part in parts(True):
                if part.get("delta") == THOUGHT[1]:
                    part = {**part, "delta": " Project Starlight."}
                yield f"data: {json.dumps(part)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers=HEADERS)

    rule = BoundRule("secrets", BannedPatterns(phrases=["project starlight"]), Action.ABORT)
    api.add_middleware(GuardrailMiddleware, rules=RuleSet.from_rules([rule]))
    with serve_in_thread(api) as base_url:
        read = read_parts(httpx.post(f"{base_url}/chat", json={}).content)
    types = [p["type"] for p in read[:-1] if p["type"] != "reasoning-delta"]
    assert types == ["start", "start-step", "reasoning-start", "reasoning-end", "finish-step", "finish"]
    assert "".join(p["delta"] for p in read[:-1] if p["type"] == "reasoning-delta").strip() == THOUGHT[0]
    assert read[-2] == {"type": "finish", "finishReason": "content-filter"}
    assert "Starlight" not in json.dumps(read)
