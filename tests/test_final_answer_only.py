"""``final_answer_only``: reasoning is checked and counted but never reaches the client; the answer streams.

Chat ``reasoning_content``, Responses reasoning summaries, Anthropic ``thinking_delta`` and
Ollama ``thinking``, each read by its own client through a real server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import ollama
import openai
import pytest
from fastapi import FastAPI
from starlette.responses import StreamingResponse

from guardrail.asgi import GuardrailMiddleware
from guardrail.asgi.record import StreamRecord
from guardrail.config import RuleSet
from guardrail.config.ruleset import RuleGroup
from guardrail.core.rule import Action, BoundRule
from guardrail.rules.banned import BannedPatterns
from tests import streams
from tests.apps import ChatChunks
from tests.servers import serve_in_thread, wait_for_records

THINKING = ["The user wants a greeting. ", "Project Starlight is secret, ", "so just say hello."]
ANSWER = ["Hello", " there!"]
RULE = BoundRule("codename", BannedPatterns(phrases=["project starlight"]), Action.LOG)


def stream(events: list[bytes], media_type: str = "text/event-stream") -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    return StreamingResponse(body(), media_type=media_type)


def responses_events() -> list[bytes]:
    events = streams.responses_stream(ANSWER)
    numbers = iter(range(100, 10_000))
    where = {"item_id": "rs_1", "output_index": 1, "summary_index": 0}
    reasoning = [
        streams.named_event(
            "response.reasoning_summary_text.delta",
            {"type": "response.reasoning_summary_text.delta", "sequence_number": next(numbers), **where, "delta": d},
        )
        for d in THINKING
    ]
    return [events[0], *reasoning, *events[1:]]


def ollama_lines() -> list[bytes]:
    head = {"model": "m", "created_at": "2024-01-01T00:00:00Z"}
    lines = [{**head, "message": {"role": "assistant", "content": "", "thinking": t}, "done": False} for t in THINKING]
    lines += [{**head, "message": {"role": "assistant", "content": a}, "done": False} for a in ANSWER]
    lines.append({**head, "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop"})
    return [json.dumps(line).encode() + b"\n" for line in lines]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, list[StreamRecord]]]:
    api = FastAPI()
    records: list[StreamRecord] = []

    @api.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        chunks = ChatChunks()
        thinking = [
            chunks.chunk([{"index": 0, "delta": {"reasoning_content": t}, "finish_reason": None}]) for t in THINKING
        ]
        return stream(
            [chunks.role(), *thinking, *(chunks.content(a) for a in ANSWER), chunks.finish(), b"data: [DONE]\n\n"]
        )

    @api.post("/v1/responses")
    async def responses() -> StreamingResponse:
        return stream(responses_events())

    @api.post("/v1/messages")
    async def messages() -> StreamingResponse:
        return stream(streams.messages_stream(ANSWER, thinking=tuple(THINKING)))

    @api.post("/api/chat")
    async def ollama_chat() -> StreamingResponse:
        return stream(ollama_lines(), "application/x-ndjson")

    group = RuleGroup("", ("/v1/*", "/api/*"), "o200k_base", (RULE,), final_answer_only=((), False))
    api.add_middleware(GuardrailMiddleware, rules=RuleSet((group,)), on_record=records.append)
    with serve_in_thread(api) as base_url:
        yield base_url, records


def test_chat_reasoning_is_withheld(served: tuple[str, list[StreamRecord]]) -> None:
    base_url, records = served
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0, timeout=10) as client:
        chunks = list(
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        )
    dumped = json.dumps([chunk.model_dump(warnings=False) for chunk in chunks])
    assert "greeting" not in dumped and "Starlight" not in dumped
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there!"
    assert chunks[-1].choices[0].finish_reason == "stop"
    wait_for_records(records)
    assert any(hit.rule == "codename" for record in records for hit in record.hits)  # checked all the same


def test_responses_reasoning_is_withheld(served: tuple[str, list[StreamRecord]]) -> None:
    base_url, _ = served
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0, timeout=10) as client:
        events = list(client.responses.create(model="m", input="hi", stream=True))
    assert not [event for event in events if event.type == "response.reasoning_summary_text.delta"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello there!"
    assert events[-1].type == "response.completed"


def test_anthropic_thinking_is_withheld(served: tuple[str, list[StreamRecord]]) -> None:
    base_url, _ = served
    with anthropic.Anthropic(base_url=base_url, api_key="k", max_retries=0, timeout=10) as client:
        with client.messages.stream(model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
    assert text == "Hello there!" and final.stop_reason == "end_turn"
    assert all(not getattr(block, "thinking", "") for block in final.content)


def test_ollama_thinking_is_withheld(served: tuple[str, list[StreamRecord]]) -> None:
    base_url, _ = served
    with ollama.Client(host=base_url) as client:
        parts: list[Any] = list(client.chat(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(p.message.content or "" for p in parts) == "Hello there!"
    assert not "".join(p.message.thinking or "" for p in parts)
    assert parts[-1].done
