"""Ollama's native API through the middleware and a real server, read by the ``ollama`` client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import ollama
import pytest
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from guardrail.asgi import GuardrailMiddleware
from guardrail.config import RuleSet
from guardrail.core.rule import Action, BoundRule, Fallback
from guardrail.rules.banned import BannedPatterns
from guardrail.rules.budget import TokenBudget
from guardrail.tokenizers import get_encoding
from tests.servers import serve_in_thread

KEY = "sk-" + "Zq9Xw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe"
DELTAS = ["Your key is ", KEY[:10], KEY[10:], " and the codename is Project", " Starlight, ok."]
SORRY = "Sorry, I can't share that."
EXPECTED = {
    Action.REDACT: ("Your key is [redacted] and the codename is [redacted], ok.", "stop"),
    Action.ABORT: ("Your key is ", "content_filter"),
    Action.FALLBACK: ("Your key is \n\n" + SORRY, "stop"),
    "budget": ("Your key is", "length"),
}


def lines(kind: str) -> list[bytes]:
    head = {"model": "llama3", "created_at": "2024-01-01T00:00:00Z"}

    def part(text: str, done: bool = False) -> dict[str, Any]:
        if kind == "chat":
            return {**head, "message": {"role": "assistant", "content": text}, "done": done}
        return {**head, "response": text, "done": done}

    final = {**part("", True), "done_reason": "stop", "eval_count": 9}
    return [json.dumps(part(delta)).encode() + b"\n" for delta in DELTAS] + [json.dumps(final).encode() + b"\n"]


def app(action: Action | str) -> FastAPI:
    api = FastAPI()

    async def answer(request: Request, kind: str) -> Response:
        payload = await request.json()
        if payload.get("stream") is False:
            whole = json.loads(lines(kind)[-1])
            text = "".join(DELTAS)
            whole["message" if kind == "chat" else "response"] = (
                {"role": "assistant", "content": text} if kind == "chat" else text
            )
            return Response(json.dumps(whole), media_type="application/json")

        async def body() -> AsyncIterator[bytes]:
            for line in lines(kind):
                yield line

        return StreamingResponse(body(), media_type="application/x-ndjson")

    @api.post("/api/chat")
    async def chat(request: Request) -> Response:
        return await answer(request, "chat")

    @api.post("/api/generate")
    async def generate(request: Request) -> Response:
        return await answer(request, "generate")

    if not isinstance(action, Action):
        rule = BoundRule("budget", TokenBudget(get_encoding("o200k_base"), max_tokens=3), Action.ABORT)
    else:
        banned = BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"], phrases=["project starlight"])
        fallback = Fallback("sorry", text=SORRY) if action is Action.FALLBACK else None
        rule = BoundRule("secrets", banned, action, fallback=fallback)
    api.add_middleware(GuardrailMiddleware, rules=RuleSet.from_rules([rule], paths=["/api/*"]))
    return api


@pytest.fixture(scope="module", params=[Action.REDACT, Action.ABORT, Action.FALLBACK, "budget"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, Action | str]]:
    with serve_in_thread(app(request.param)) as base_url:
        yield base_url, request.param


def test_the_ollama_client_streams_chat_and_generate(served: tuple[str, Action | str]) -> None:
    base_url, action = served
    with ollama.Client(host=base_url) as client:
        chat = list(client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}], stream=True))
        generated = list(client.generate(model="llama3", prompt="hi", stream=True))
    texts = ["".join(p.message.content or "" for p in chat), "".join(p.response or "" for p in generated)]
    assert texts == [EXPECTED[action][0]] * 2
    for last in (chat[-1], generated[-1]):
        assert last.done and last.done_reason == EXPECTED[action][1]


def test_the_ollama_client_reads_whole_answers(served: tuple[str, Action | str]) -> None:
    base_url, action = served
    with ollama.Client(host=base_url) as client:
        chat = client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}], stream=False)
        generated = client.generate(model="llama3", prompt="hi", stream=False)
    expected = EXPECTED[action][0]
    assert chat.message.content == expected and generated.response == expected
    if action in (Action.ABORT, "budget"):
        assert chat.done_reason == generated.done_reason == EXPECTED[action][1]
