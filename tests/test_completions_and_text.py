"""Legacy completions (read by the openai SDK) and plain text (read by httpx) through a real server.

Every action and a budget, streamed; completions whole too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
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
# Plain text has no place for a reason: a stop simply ends the body.
TEXT_EXPECTED = {k: v[0] for k, v in EXPECTED.items()}


def app(action: Action | str) -> FastAPI:
    api = FastAPI()
    head = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        payload = await request.json()
        if not payload.get("stream"):
            choice = {"index": 0, "text": "".join(DELTAS), "logprobs": None, "finish_reason": "stop"}
            return Response(json.dumps({**head, "choices": [choice]}), media_type="application/json")

        async def body() -> AsyncIterator[bytes]:
            for number, delta in enumerate(DELTAS):
                last = number == len(DELTAS) - 1  # the last text comes with its finish, as vLLM sends it
                choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": "stop" if last else None}
                yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    @api.post("/v1/text")
    async def text() -> Response:
        async def body() -> AsyncIterator[bytes]:
            for delta in DELTAS:
                yield delta.encode()

        return StreamingResponse(body(), media_type="text/plain")

    if not isinstance(action, Action):
        rule = BoundRule("budget", TokenBudget(get_encoding("o200k_base"), max_tokens=3), Action.ABORT)
    else:
        banned = BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"], phrases=["project starlight"])
        fallback = Fallback("sorry", text=SORRY) if action is Action.FALLBACK else None
        rule = BoundRule("secrets", banned, action, fallback=fallback)
    api.add_middleware(GuardrailMiddleware, rules=RuleSet.from_rules([rule], paths=["/v1/*"]))
    return api


@pytest.fixture(scope="module", params=[Action.REDACT, Action.ABORT, Action.FALLBACK, "budget"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, Action | str]]:
    with serve_in_thread(app(request.param)) as base_url:
        yield base_url, request.param


def test_the_openai_sdk_streams_guarded_completions(served: tuple[str, Action | str]) -> None:
    base_url, action = served
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0) as client:
        chunks = list(client.completions.create(model="m", prompt="hi", stream=True))
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    reasons = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert text == EXPECTED[action][0]
    assert reasons == [EXPECTED[action][1]]


def test_the_openai_sdk_reads_a_whole_guarded_completion(served: tuple[str, Action | str]) -> None:
    base_url, action = served
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0) as client:
        completion = client.completions.create(model="m", prompt="hi")
    assert completion.choices[0].text == EXPECTED[action][0]
    assert completion.choices[0].finish_reason == EXPECTED[action][1]


def test_plain_text_is_guarded_as_it_streams(served: tuple[str, Action | str]) -> None:
    base_url, action = served
    with httpx.stream("POST", f"{base_url}/v1/text", json={}) as response:
        assert response.headers["content-type"].startswith("text/plain")
        body = b"".join(response.iter_raw()).decode()
    assert body == TEXT_EXPECTED[action]
