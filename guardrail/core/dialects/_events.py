"""What dialects share about events: the strings an SSE block shows besides its data, reading a
named JSON event (Responses, Anthropic), and writing a spliced one again."""

from __future__ import annotations

from typing import Any

from guardrail.core import jsontext
from guardrail.core.dialect import EventKind, Kind, Parsed, Piece
from guardrail.core.sse import SSEEvent, encode_event


def sse_others(event: SSEEvent | None) -> tuple[str, ...]:
    """The strings an SSE block shows a client besides its data: ``event``, ``id``, comments."""
    if event is None or (event.event is None and event.id is None and not event.comments):
        return ()
    return tuple(value for value in (event.event, event.id, *event.comments) if value)


def content_texts(content: object) -> list[str]:
    """The text of a message's ``content``: a string, or the ``text`` of its parts."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
    return []


def read_named(frame: bytes, event: SSEEvent, what: str) -> Parsed | tuple[dict[str, Any], tuple[str, ...]]:
    """A named JSON event's object and its SSE strings; or, for what carries no such object, its Parsed."""
    others = sse_others(event)
    if event.data is None:
        return Parsed(EventKind.PASS, frame, others=others)
    try:
        obj = jsontext.loads(event.data)
    except jsontext.Malformed as exc:
        return Parsed(EventKind.MALFORMED, frame, detail=f"an event whose data is {exc}")
    if type(obj) is not dict or type(obj.get("type")) is not str:
        return Parsed(EventKind.UNKNOWN, frame, others=(*others, *jsontext.strings(obj)), detail=f"not {what}")
    return obj, others


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


def whole_strings(
    pieces: list[Piece], others: list[str], channel: str, path: tuple[Any, ...], value: object, known: frozenset[str]
) -> None:
    """Each string inside ``value`` (a tool call that arrives whole) as a channel of its own.

    Channels are named from ``channel`` by the keys and positions that lead to each string;
    keys not in ``known`` go to ``others``.
    """
    stack: list[tuple[str, tuple[Any, ...], object]] = [(channel, path, value)]
    while stack:
        name, where, node = stack.pop()
        if type(node) is str:
            if node:
                pieces.append(Piece(name, node, where, Kind.TOOL))
        elif type(node) is dict:
            others.extend(key for key in node if key not in known)
            stack.extend((f"{name}.{key}", (*where, key), child) for key, child in node.items())
        elif type(node) is list:
            stack.extend((f"{name}[{i}]", (*where, i), child) for i, child in enumerate(node))


def spells(entries: list[Any], text: str) -> bool:
    """Whether logprobs entries' tokens, and their bytes where given, join to exactly ``text``."""
    tokens: list[str] = []
    raw = bytearray()
    for entry in entries:
        token = entry.get("token") if type(entry) is dict else None
        if type(token) is not str:
            return False
        tokens.append(token)
        spelled = entry.get("bytes")
        if spelled is not None:
            if type(spelled) is not list or not all(type(b) is int and 0 <= b < 256 for b in spelled):
                return False
            raw.extend(spelled)
    return "".join(tokens) == text and (not raw or bytes(raw) == text.encode())
