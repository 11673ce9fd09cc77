"""An answer cut short (no finish, no end event) reaches every SDK as an error naming the truncation.

Without it, the SDKs end quietly and an app takes half an answer for the whole one
(wire-formats §7, "clean EOF, no terminator").
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
from google import genai
from google.genai import errors, types
from starlette.responses import Response, StreamingResponse

from guardrail.asgi import GuardrailMiddleware
from guardrail.asgi.record import StreamRecord
from guardrail.config import RuleSet
from guardrail.core.rule import Action, BoundRule
from guardrail.rules.banned import BannedPatterns
from tests.servers import serve_in_thread, wait_for_records
from tests.streams import messages_stream

RULE = BoundRule("secrets", BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"]), Action.REDACT)
HEAD = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def cut(frames: list[bytes], media_type: str) -> Response:
    async def body() -> AsyncIterator[bytes]:
        for frame in frames:
            yield frame

    return StreamingResponse(body(), media_type=media_type)


def app(records: list[StreamRecord]) -> FastAPI:
    api = FastAPI()

    @api.post("/v1/chat/completions")
    async def chat() -> Response:
        chunk = {**HEAD, "choices": [{"index": 0, "delta": {"content": "Half an"}, "finish_reason": None}]}
        return cut([f"data: {json.dumps(chunk)}\n\n".encode()], "text/event-stream")

    @api.post("/v1/messages")
    async def messages() -> Response:
        return cut(messages_stream(["Half an"])[:4], "text/event-stream")  # up to the first delta

    @api.post("/api/chat")
    async def local() -> Response:
        line = {"model": "m", "created_at": "", "message": {"role": "assistant", "content": "Half an"}, "done": False}
        return cut([json.dumps(line).encode() + b"\n"], "application/x-ndjson")

    @api.post("/v1beta/models/{model}:streamGenerateContent")
    async def gemini(model: str) -> Response:
        chunk = {"candidates": [{"content": {"role": "model", "parts": [{"text": "Half an"}]}, "index": 0}]}
        return cut([f"data: {json.dumps(chunk)}\n\n".encode()], "text/event-stream")

    api.add_middleware(GuardrailMiddleware, rules=RuleSet.from_rules([RULE]), on_record=records.append)
    return api


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, list[StreamRecord]]]:
    records: list[StreamRecord] = []
    with serve_in_thread(app(records)) as base_url:
        yield base_url, records


def last_outcome(records: list[StreamRecord]) -> Any:
    wait_for_records(records)
    return records.pop().outcome


def test_the_openai_sdk_raises_with_the_truncation_code(served: tuple[str, list[StreamRecord]]) -> None:
    base_url, records = served
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0) as client:
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        with pytest.raises(openai.APIError) as raised:
            list(stream)
    assert raised.value.code == "upstream_truncated"
    assert last_outcome(records) == "upstream_error"


def test_the_anthropic_sdk_raises(served: tuple[str, list[StreamRecord]]) -> None:
    base_url, records = served
    with anthropic.Anthropic(base_url=base_url, api_key="k", max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError) as raised:
            list(
                client.messages.create(
                    model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}], stream=True
                )
            )
    assert "(code: upstream_truncated)" in str(raised.value)
    assert last_outcome(records) == "upstream_error"


def test_the_ollama_client_raises(served: tuple[str, list[StreamRecord]]) -> None:
    base_url, records = served
    with ollama.Client(host=base_url) as client:
        with pytest.raises(ollama.ResponseError) as raised:
            list(client.chat(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "(code: upstream_truncated)" in str(raised.value)
    assert last_outcome(records) == "upstream_error"


def test_google_genai_raises_with_the_truncation_reason(served: tuple[str, list[StreamRecord]]) -> None:
    base_url, records = served
    client = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=base_url, api_version="v1beta"))
    with pytest.raises(errors.APIError) as raised:
        list(client.models.generate_content_stream(model="m", contents="hi"))
    assert "upstream_truncated" in json.dumps(raised.value.details)
    assert last_outcome(records) == "upstream_error"
