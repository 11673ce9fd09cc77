"""Gemini through the middleware and a real server, read by ``google-genai``.

Streamed (``:streamGenerateContent?alt=sse``), whole (``:generateContent``) and the stream
endpoint without ``alt=sse`` (one JSON array), for every action and a budget.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI, Request
from google import genai
from google.genai import errors, types
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
THOUGHT = "I should not say Project Starlight."
SORRY = "Sorry, I can't share that."
EXPECTED = {
    Action.REDACT: ("Your key is [redacted] and the codename is [redacted], ok.", "STOP"),
    Action.ABORT: ("Your key is ", "SAFETY"),
    Action.FALLBACK: ("Your key is \n\n" + SORRY, "STOP"),
    "budget": ("Your key is", "MAX_TOKENS"),
}
HEAD = {"modelVersion": "gemini-x", "responseId": "r1"}


def chunk(text: str, *, thought: bool = False, finish: str | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {"text": text, **({"thought": True} if thought else {})}
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": [part]}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    usage = {"promptTokenCount": 2, "candidatesTokenCount": 20, "totalTokenCount": 22}
    return {"candidates": [candidate], **({"usageMetadata": usage} if finish else {}), **HEAD}


def chunks(thought: str) -> list[dict[str, Any]]:
    # The last text arrives on the chunk that finishes, as Gemini sends it.
    first = [chunk(thought, thought=True)] if thought else []
    return [*first, *(chunk(d) for d in DELTAS[:-1]), chunk(DELTAS[-1], finish="STOP")]


def app(action: Action | str) -> FastAPI:
    api = FastAPI()
    thought = THOUGHT if isinstance(action, Action) else ""

    @api.post("/{version}/models/{model}:streamGenerateContent")
    async def stream(request: Request, version: str, model: str) -> Response:
        if request.query_params.get("alt") != "sse":
            return Response(json.dumps(chunks(thought)), media_type="application/json")

        async def body() -> AsyncIterator[bytes]:
            for each in chunks(thought):
                yield f"data: {json.dumps(each)}\r\n\r\n".encode()

        return StreamingResponse(body(), media_type="text/event-stream")

    @api.post("/{version}/models/{model}:generateContent")
    async def whole(request: Request, version: str, model: str) -> Response:
        body = chunk("".join(DELTAS), finish="STOP")
        if thought:
            body["candidates"][0]["content"]["parts"].insert(0, {"text": thought, "thought": True})
        return Response(json.dumps(body), media_type="application/json")

    if not isinstance(action, Action):
        # (Reasoning counts as output too: budgets are tested on answers without it.)
        rule = BoundRule("budget", TokenBudget(get_encoding("o200k_base"), max_tokens=3), Action.ABORT)
    else:
        banned = BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"], phrases=["project starlight"])
        fallback = Fallback("sorry", text=SORRY) if action is Action.FALLBACK else None
        rule = BoundRule("secrets", banned, action, fallback=fallback)
    group = RuleGroup("", ("/v1/*", "/v1beta/*"), "o200k_base", (rule,), final_answer_only=((), False))
    api.add_middleware(GuardrailMiddleware, rules=RuleSet((group,)))
    return api


def client(base_url: str) -> genai.Client:
    return genai.Client(api_key="test", http_options=types.HttpOptions(base_url=base_url))


@pytest.fixture(scope="module", params=[Action.REDACT, Action.ABORT, Action.FALLBACK, "budget"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, Action | str]]:
    with serve_in_thread(app(request.param)) as base_url:
        yield base_url, request.param


def answer_text(responses: list[types.GenerateContentResponse]) -> tuple[str, list[str]]:
    texts: list[str] = []
    thoughts: list[str] = []
    for response in responses:
        for candidate in response.candidates or ():
            for part in (candidate.content.parts or []) if candidate.content else []:
                (thoughts if part.thought else texts).append(part.text or "")
    return "".join(texts), thoughts


def test_google_genai_streams_the_guarded_answer(served: tuple[str, Action | str]) -> None:
    base_url, action = served
    gemini = client(base_url)  # (kept: the client closes its connections when collected)
    responses = list(gemini.models.generate_content_stream(model="gemini-x", contents="hi"))
    text, thoughts = answer_text(responses)
    assert text == EXPECTED[action][0]
    assert thoughts == []  # final answer only: the thought was checked, never sent, not even empty
    last = responses[-1].candidates[0]  # type: ignore[index]
    assert last.finish_reason == types.FinishReason(EXPECTED[action][1])
    assert all(r.model_version == "gemini-x" for r in responses)


def test_google_genai_reads_whole_answers(served: tuple[str, Action | str]) -> None:
    base_url, action = served
    gemini = client(base_url)
    response = gemini.models.generate_content(model="gemini-x", contents="hi")
    text, thoughts = answer_text([response])
    assert text == EXPECTED[action][0]
    assert thoughts == []
    assert response.candidates[0].finish_reason == types.FinishReason(EXPECTED[action][1])  # type: ignore[index]


def test_the_stream_endpoint_without_sse_is_one_guarded_array(served: tuple[str, Action | str]) -> None:
    base_url, action = served
    url = f"{base_url}/v1beta/models/gemini-x:streamGenerateContent"
    body = httpx.post(url, json={"contents": [{"parts": [{"text": "hi"}]}]}).json()
    assert isinstance(body, list)
    text = "".join(
        part.get("text", "")
        for item in body
        for candidate in item["candidates"]
        for part in candidate.get("content", {}).get("parts", [])
        if not part.get("thought")
    )
    assert text == EXPECTED[action][0]
    assert KEY not in json.dumps(body) and "Starlight" not in json.dumps(body)
    assert body[-1]["candidates"][0]["finishReason"] == EXPECTED[action][1]


def test_an_idle_timeout_is_an_error_google_genai_raises_with_the_code() -> None:
    api = FastAPI()

    @api.post("/{version}/models/{model}:streamGenerateContent")
    async def stream(version: str, model: str) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield f"data: {json.dumps(chunk('Hello'))}\n\n".encode()
            await anyio.sleep(30)

        return StreamingResponse(body(), media_type="text/event-stream")

    rule = BoundRule("idle", IdleTimeout(0.3), Action.ABORT)
    api.add_middleware(GuardrailMiddleware, rules=RuleSet.from_rules([rule], paths=["/v1/*", "/v1beta/*"]))
    with serve_in_thread(api) as base_url:
        seen: list[str] = []
        gemini = client(base_url)
        with pytest.raises(errors.APIError) as raised:
            for response in gemini.models.generate_content_stream(model="gemini-x", contents="hi"):
                seen.append(response.text or "")
    assert seen == ["Hello"]
    assert raised.value.code == 504
    assert "idle_timeout" in json.dumps(raised.value.details)
