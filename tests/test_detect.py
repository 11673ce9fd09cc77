"""A response on a path that names no dialect is read in the dialect its first event shows."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.responses import Response, StreamingResponse

from guardrail.asgi import GuardrailMiddleware
from guardrail.config import RuleSet
from guardrail.core.dialect import Framing
from guardrail.core.dialects import start_stream
from guardrail.core.dialects.detect import dialect_of
from guardrail.core.engine import StreamGuard
from guardrail.core.outputs import Send
from guardrail.core.rule import Action, BoundRule
from guardrail.rules.banned import BannedPatterns
from tests.servers import serve_in_thread
from tests.streams import messages_body, messages_stream, responses_body, responses_stream

KEY = "sk-" + "Zq9Xw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe"
DELTAS = ["Your key is ", KEY[:10], KEY[10:], " ok."]
RULE = BoundRule("secrets", BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"]), Action.REDACT)


def sse(objects: list[Any]) -> list[bytes]:
    return [f"data: {json.dumps(obj)}\n\n".encode() for obj in objects]


def chat_stream() -> list[bytes]:
    head = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunks = [{**head, "choices": [{"index": 0, "delta": {"content": d}, "finish_reason": None}]} for d in DELTAS]
    return [*sse(chunks), b"data: [DONE]\n\n"]


def completions_stream() -> list[bytes]:
    head = {"id": "c1", "object": "text_completion", "created": 1, "model": "m"}
    chunks = [{**head, "choices": [{"index": 0, "text": d, "finish_reason": None}]} for d in DELTAS]
    return [*sse(chunks), b"data: [DONE]\n\n"]


def gemini_stream() -> list[bytes]:
    return sse([{"candidates": [{"content": {"role": "model", "parts": [{"text": d}]}, "index": 0}]} for d in DELTAS])


def ui_stream() -> list[bytes]:
    parts = [{"type": "text-start", "id": "t"}, *({"type": "text-delta", "id": "t", "delta": d} for d in DELTAS)]
    return [*sse([*parts, {"type": "text-end", "id": "t"}, {"type": "finish"}]), b"data: [DONE]\n\n"]


STREAMS = {
    "openai_chat": chat_stream(),
    "openai_completions": completions_stream(),
    "openai_responses": responses_stream(DELTAS),
    "anthropic_messages": messages_stream(DELTAS),
    "gemini": gemini_stream(),
    "vercel_ui": ui_stream(),
}
BODIES = {
    "openai_responses": responses_body("".join(DELTAS)),
    "anthropic_messages": messages_body("".join(DELTAS)),
    "gemini": {"candidates": [{"content": {"parts": [{"text": "".join(DELTAS)}]}, "finishReason": "STOP"}]},
    "ollama": {"model": "m", "created_at": "", "message": {"content": "".join(DELTAS)}, "done": True},
}


@pytest.mark.parametrize("dialect", STREAMS)
def test_the_first_event_tells_the_dialect_and_the_stream_is_guarded_in_it(dialect: str) -> None:
    guard = StreamGuard([RULE], start_stream(None, Framing.SSE))
    out = b""
    for data in [b": a comment first\n\n", *STREAMS[dialect]]:
        out += b"".join(o.data for o in guard.feed(data) if isinstance(o, Send))
    out += b"".join(o.data for o in guard.close() if isinstance(o, Send))
    assert guard.dialect == dialect
    assert KEY[:10] not in out.decode() and "[redacted]" in out.decode()


@pytest.mark.parametrize("dialect", BODIES)
def test_whole_bodies_tell_their_dialect(dialect: str) -> None:
    assert dialect_of(BODIES[dialect]) == dialect


def test_shapes_of_no_dialect_are_read_as_chat() -> None:
    for shape in ({"hello": "world"}, [1, 2], "text", None, {"type": 3}):
        assert dialect_of(shape) is None
    guard = StreamGuard([RULE], start_stream(None, Framing.SSE))
    out = guard.feed(f'data: {{"note": "{KEY}"}}\n\n'.encode())
    assert guard.dialect == "openai_chat"
    assert not any(isinstance(o, Send) and KEY.encode() in o.data for o in out)


def test_the_middleware_reads_an_unnamed_path_by_its_first_event() -> None:
    api = FastAPI()
    records: list[Any] = []

    @api.post("/generate")
    async def generate() -> Response:
        async def body() -> AsyncIterator[bytes]:
            for event in messages_stream(DELTAS):
                yield event

        return StreamingResponse(body(), media_type="text/event-stream")

    api.add_middleware(GuardrailMiddleware, rules=RuleSet.from_rules([RULE]), on_record=records.append)
    with serve_in_thread(api) as base_url:
        text = httpx.post(f"{base_url}/generate", json={}).text
    assert KEY[:10] not in text and "[redacted]" in text and "event: message_stop" in text
    assert records[0].dialect == "anthropic_messages"


def test_a_stream_that_switches_dialects_after_the_first_event_is_ended() -> None:
    # Told Gemini by its first event, then chat chunks splitting a key: a chat client would join them.
    guard = StreamGuard([RULE], start_stream(None, Framing.SSE))
    body = [b'data: {"candidates": []}\n\n', *chat_stream()]
    out = b"".join(o.data for data in body for o in guard.feed(data) if isinstance(o, Send))
    assert guard.dialect == "gemini" and guard.ended
    assert KEY[:10].encode() not in out and b"malformed_event" in out
