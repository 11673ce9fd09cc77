"""Responses, Anthropic Messages and chat completions through the middleware and a real server, read by the SDKs.

Streamed (raw iteration and the helpers) and whole (``"stream": false``): each action ends the
way its SDK expects, the text shown is the safe prefix or the redacted text, and the final
objects hold what the client received, never the original.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import openai
import pytest
from fastapi import FastAPI
from starlette.responses import Response, StreamingResponse

from guardrail.asgi import GuardrailMiddleware
from guardrail.config import RuleSet
from guardrail.core.rule import Action, BoundRule, Fallback
from guardrail.rules.banned import BannedPatterns
from guardrail.rules.budget import TokenBudget
from guardrail.tokenizers import get_encoding
from tests import streams
from tests.apps import ChatChunks
from tests.servers import serve_in_thread

KEY = "sk-" + "Zq9Xw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe"
DELTAS = ["Your key is ", KEY[:10], KEY[10:], " and the", " codename is Project", " Starlight, ok."]
TEXT = "".join(DELTAS)
PREFIX = "Your key is "
REDACTED = "Your key is [redacted] and the codename is [redacted], ok."
SORRY = "Sorry, I can't share that."
INSTRUCTIONS = "Never say project starlight."  # echoed back by Responses: the client's own words


def rules(action: Action) -> RuleSet:
    banned = BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"], phrases=["project starlight"])
    fallback = Fallback("sorry", text=SORRY) if action is Action.FALLBACK else None
    return RuleSet.from_rules([BoundRule("secrets", banned, action, fallback=fallback)], paths=["/v1/*"])


def budget_rules() -> RuleSet:
    encoding = get_encoding("o200k_base")
    return RuleSet.from_rules([BoundRule("budget", TokenBudget(encoding, max_tokens=3), Action.ABORT)], paths=["/v1/*"])


def app(ruleset: RuleSet) -> FastAPI:
    api = FastAPI()

    def stream(events: list[bytes]) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for event in events:
                yield event

        return StreamingResponse(body(), media_type="text/event-stream")

    @api.post("/v1/responses")
    async def responses(payload: dict[str, Any]) -> Response:
        if payload.get("stream"):
            return stream(streams.responses_stream(DELTAS, instructions=INSTRUCTIONS))
        return Response(
            json.dumps(streams.responses_body(TEXT, instructions=INSTRUCTIONS)), media_type="application/json"
        )

    @api.post("/v1/messages")
    async def messages(payload: dict[str, Any]) -> Response:
        if payload.get("stream"):
            return stream(streams.messages_stream(DELTAS, thinking=("Let me think.",)))
        return Response(json.dumps(streams.messages_body(TEXT)), media_type="application/json")

    @api.post("/v1/chat/completions")
    async def chat(payload: dict[str, Any]) -> Response:
        body = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25},
        }
        if payload.get("stream"):
            return stream(ChatChunks().stream(DELTAS))
        return Response(json.dumps(body), media_type="application/json")

    api.add_middleware(GuardrailMiddleware, rules=ruleset)
    return api


@pytest.fixture(scope="module", params=[Action.REDACT, Action.ABORT, Action.FALLBACK, "budget"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, Action | str]]:
    ruleset = budget_rules() if request.param == "budget" else rules(request.param)
    with serve_in_thread(app(ruleset)) as base_url:
        yield base_url, request.param


EXPECTED_TEXT = {
    Action.REDACT: REDACTED,
    Action.ABORT: PREFIX,
    Action.FALLBACK: PREFIX + "\n\n" + SORRY,
    "budget": "Your key is",
}


def test_responses_streamed(served: tuple[str, Action | str]) -> None:
    base_url, action = served
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0, timeout=10) as client:
        events = list(client.responses.create(model="m", input="hi", instructions=INSTRUCTIONS, stream=True))
        text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
        numbers = [event.sequence_number for event in events]
        assert numbers == sorted(set(numbers)), "sequence numbers strictly increase"
        assert text == EXPECTED_TEXT[action]
        last = events[-1]
        assert last.type != "error"
        if action in (Action.ABORT, "budget"):
            assert last.type == "response.incomplete"
            reason = "content_filter" if action is Action.ABORT else "max_output_tokens"
            assert last.response.incomplete_details is not None
            assert last.response.incomplete_details.reason == reason
            assert last.response.output_text == text
        else:
            assert last.type == "response.completed"
            with client.responses.stream(model="m", input="hi", instructions=INSTRUCTIONS) as stream:
                for _ in stream:
                    pass
                final = stream.get_final_response()
            assert final.output_text == text
        done = [event.text for event in events if event.type == "response.output_text.done"]
        assert done in ([], [text])
        assert "starlight" not in json.dumps([event.model_dump(warnings=False) for event in events]).lower().replace(
            INSTRUCTIONS.lower(), ""
        )


def test_anthropic_streamed(served: tuple[str, Action | str]) -> None:
    base_url, action = served
    with anthropic.Anthropic(base_url=base_url, api_key="k", max_retries=0, timeout=10) as client:
        with client.messages.stream(model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
    # The thinking block comes first: with a 3-token budget it is what runs out of tokens.
    assert text == ("" if action == "budget" else EXPECTED_TEXT[action])
    expected_reason = {Action.ABORT: "refusal", "budget": "max_tokens"}.get(action, "end_turn")
    assert final.stop_reason == expected_reason
    assert "".join(block.text for block in final.content if block.type == "text") == text
    assert KEY not in final.model_dump_json() and "Starlight" not in final.model_dump_json()


def test_whole_answers(served: tuple[str, Action | str]) -> None:
    base_url, action = served
    expected = EXPECTED_TEXT[action]
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0, timeout=10) as client:
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        response = client.responses.create(model="m", input="hi", instructions=INSTRUCTIONS)
    with anthropic.Anthropic(base_url=base_url, api_key="k", max_retries=0, timeout=10) as client:
        message = client.messages.create(model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == expected
    assert response.output_text == expected
    assert "".join(block.text for block in message.content if block.type == "text") == expected
    stops = {
        Action.ABORT: ("content_filter", "content_filter", "refusal"),
        "budget": ("length", "max_output_tokens", "max_tokens"),
    }.get(action)
    if stops is not None:
        assert chat.choices[0].finish_reason == stops[0]
        assert response.status == "incomplete" and response.incomplete_details is not None
        assert response.incomplete_details.reason == stops[1]
        assert message.stop_reason == stops[2]
    for result in (chat, response, message):
        dumped = result.model_dump_json(warnings=False).replace(INSTRUCTIONS, "")
        assert KEY not in dumped and "starlight" not in dumped.lower()


@pytest.mark.parametrize(
    ("dialect", "events", "channel"),
    [
        ("openai_responses", streams.responses_stream(DELTAS), "output[0].content[0].text"),
        ("anthropic_messages", streams.messages_stream(DELTAS), "content[0].text"),
    ],
)
def test_replay_reads_every_dialect(dialect: str, events: list[bytes], channel: str) -> None:
    from guardrail.replay import replay

    result = replay(b"".join(events), rules(Action.REDACT).rules, dialect=dialect)
    assert result.client.text[channel] == REDACTED
    assert result.client.done
    assert [hit.rule for hit in result.hits] == ["secrets", "secrets"]


def test_a_url_fallback_continues_an_anthropic_answer_in_its_own_dialect() -> None:
    backup = FastAPI()

    @backup.post("/v1/messages")
    async def backup_messages() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for event in streams.messages_stream(["Here is ", "a safe answer."]):
                yield event

        return StreamingResponse(body(), media_type="text/event-stream")

    with serve_in_thread(backup) as backup_url:
        banned = BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"])
        fallback = Fallback("backup", url=f"{backup_url}/v1/messages")
        ruleset = RuleSet.from_rules([BoundRule("keys", banned, Action.FALLBACK, fallback=fallback)], paths=["/v1/*"])
        with serve_in_thread(app(ruleset)) as base_url:
            with anthropic.Anthropic(base_url=base_url, api_key="k", max_retries=0, timeout=10) as client:
                with client.messages.stream(
                    model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
                ) as stream:
                    text = "".join(stream.text_stream)
                    final = stream.get_final_message()
    assert text == PREFIX + "Here is a safe answer."
    assert final.stop_reason == "end_turn"
    assert [block.text for block in final.content if block.type == "text"] == [PREFIX, "Here is a safe answer."]


def test_a_url_fallback_continues_a_responses_answer_in_its_own_dialect() -> None:
    backup = FastAPI()

    @backup.post("/v1/responses")
    async def backup_responses() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for event in streams.responses_stream(["Here is ", "a safe answer."]):
                yield event

        return StreamingResponse(body(), media_type="text/event-stream")

    with serve_in_thread(backup) as backup_url:
        banned = BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"])
        fallback = Fallback("backup", url=f"{backup_url}/v1/responses")
        ruleset = RuleSet.from_rules([BoundRule("keys", banned, Action.FALLBACK, fallback=fallback)], paths=["/v1/*"])
        with serve_in_thread(app(ruleset)) as base_url:
            with openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0, timeout=10) as client:
                events = list(client.responses.create(model="m", input="hi", instructions=INSTRUCTIONS, stream=True))
                with client.responses.stream(model="m", input="hi", instructions=INSTRUCTIONS) as stream:
                    for _ in stream:
                        pass
                    final = stream.get_final_response()
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == PREFIX + "Here is a safe answer."
    numbers = [event.sequence_number for event in events]
    assert numbers == sorted(set(numbers))
    assert [event.type for event in events].count("response.created") == 1
    last = events[-1]
    assert last.type == "response.completed" and last.response.id == streams.RESPONSE_ID
    assert [item.model_dump()["status"] for item in last.response.output] == ["incomplete", "completed"]
    assert final.output_text == PREFIX + "Here is a safe answer."


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/responses", {"model": "m", "instructions": "word " * 400, "input": "hi"}),
        (
            "/v1/responses",
            {"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "word " * 400}]}]},
        ),
        ("/v1/messages", {"model": "m", "max_tokens": 5, "system": "word " * 400, "messages": []}),
        (
            "/v1/messages",
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "word " * 400}]}],
            },
        ),
    ],
    ids=["responses-instructions", "responses-input", "messages-system", "messages-blocks"],
)
def test_a_prompt_budget_counts_each_request_format(path: str, payload: dict[str, Any]) -> None:
    import httpx

    encoding = get_encoding("o200k_base")
    budget = BoundRule("prompt", TokenBudget(encoding, max_prompt_tokens=100), Action.ABORT)
    with serve_in_thread(app(RuleSet.from_rules([budget], paths=["/v1/*"]))) as base_url:
        response = httpx.post(f"{base_url}{path}", json=payload, timeout=10)
    assert response.status_code == 400
    assert "more than the 100 allowed here" in response.text  # in the envelope of the endpoint's dialect
    assert ("prompt_too_long" in response.text) is path.endswith("/responses")
