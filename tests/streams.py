"""Builders of Responses and Anthropic Messages answers, streamed (named SSE events) and whole."""

from __future__ import annotations

import json
from typing import Any

RESPONSE_ID = "resp_test"
MESSAGE_ID = "msg_test"


def named_event(name: str, obj: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode()


def responses_stream(deltas: list[str], *, instructions: str = "") -> list[bytes]:
    """A Responses stream: one message item whose text arrives in ``deltas``."""
    text = "".join(deltas)
    numbers = iter(range(10_000))

    def event(kind: str, **fields: Any) -> bytes:
        return named_event(kind, {"type": kind, "sequence_number": next(numbers), **fields})

    head = {"id": RESPONSE_ID, "object": "response", "created_at": 1730000000, "model": "gpt-test"}
    if instructions:
        head["instructions"] = instructions
    where = {"item_id": MESSAGE_ID, "output_index": 0, "content_index": 0}
    item = {"id": MESSAGE_ID, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    done_item = {**item, "status": "completed", "content": [{"type": "output_text", "text": text, "annotations": []}]}
    usage = {
        "input_tokens": 5,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 9,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 14,
    }
    return [
        event("response.created", response={**head, "status": "in_progress", "output": [], "usage": None}),
        event("response.output_item.added", output_index=0, item=item),
        event("response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []}),
        *(event("response.output_text.delta", **where, delta=delta, logprobs=[]) for delta in deltas),
        event("response.output_text.done", **where, text=text, logprobs=[]),
        event("response.content_part.done", **where, part={"type": "output_text", "text": text, "annotations": []}),
        event("response.output_item.done", output_index=0, item=done_item),
        event("response.completed", response={**head, "status": "completed", "output": [done_item], "usage": usage}),
    ]


def responses_body(text: str, *, instructions: str = "") -> dict[str, Any]:
    item = {
        "id": MESSAGE_ID,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    body: dict[str, Any] = {
        "id": RESPONSE_ID,
        "object": "response",
        "created_at": 1730000000,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "model": "gpt-test",
        "output": [item],
        "usage": {"input_tokens": 5, "output_tokens": 9, "total_tokens": 14},
    }
    if instructions:
        body["instructions"] = instructions
    return body


def messages_stream(deltas: list[str], *, thinking: tuple[str, ...] = ()) -> list[bytes]:
    """An Anthropic Messages stream: an optional thinking block, then one text block of ``deltas``."""
    message: dict[str, Any] = {
        "id": MESSAGE_ID,
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 1},
    }
    events = [named_event("message_start", {"type": "message_start", "message": message})]
    index = 0
    if thinking:
        block = {"type": "thinking", "thinking": "", "signature": ""}
        events.append(
            named_event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
        )
        for piece in thinking:
            delta = {"type": "thinking_delta", "thinking": piece}
            events.append(
                named_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            )
        events.append(named_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        index = 1
    block = {"type": "text", "text": ""}
    events.append(
        named_event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
    )
    events.append(named_event("ping", {"type": "ping"}))
    for piece in deltas:
        delta = {"type": "text_delta", "text": piece}
        events.append(
            named_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        )
    events.append(named_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    stop = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 12},
    }
    events.append(named_event("message_delta", stop))
    events.append(named_event("message_stop", {"type": "message_stop"}))
    return events


def messages_body(text: str) -> dict[str, Any]:
    return {
        "id": MESSAGE_ID,
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 12},
    }
