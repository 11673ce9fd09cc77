"""What the dialects of named JSON events (Responses, Anthropic) share when they splice events."""

from __future__ import annotations

from typing import Any

from guardrail.core import jsontext
from guardrail.core.sse import SSEEvent, encode_event


def event_object(event: SSEEvent) -> dict[str, Any] | None:
    """The JSON object an event's data holds, or None (no data, not JSON, not an object)."""
    try:
        obj = jsontext.loads(event.data or "")
    except jsontext.Malformed:
        return None
    return obj if type(obj) is dict else None


def reencoded(obj: dict[str, Any], event: SSEEvent, prefix: bytes = b"") -> tuple[bytes, SSEEvent]:
    """``obj`` written as ``event`` again (its name kept), after ``prefix``: the bytes and the event."""
    data = jsontext.dumps(obj)
    frame = prefix + encode_event(data, event=event.event)
    return frame, SSEEvent(frame, data, event.event, event.id, event.retry, event.comments)
