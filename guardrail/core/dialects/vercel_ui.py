"""The Vercel AI SDK's UI message stream (``x-vercel-ai-ui-message-stream: v1``), what ``useChat`` reads.

Data-only SSE, one JSON part per event, ending with ``data: [DONE]`` (wire-formats §6.2).
Channels: ``text-delta`` (``text:ID``), ``reasoning-delta`` (``reasoning:ID``, reasoning) and
``tool-input-delta`` (``tool:CALL``, the tool input's JSON text); ``text-end``,
``reasoning-end`` and ``tool-input-available`` end theirs. A tool input that arrives whole
(``tool-input-available`` with no deltas before it) is checked as its channel's only text; one
that was streamed is written again from what the client received. ``finish-step`` and
``finish`` wait until held text has gone out. Every other string (sources, files, ``data-*``
parts, tool outputs, metadata) is checked whole; a part of a type this dialect does not know
passes if its strings are clean.

Endings (§8.7): a stop ends the open text and reasoning parts, closes the step, and finishes
with ``finishReason`` ``content-filter`` (``length`` for a budget), then ``[DONE]``; fallback text
is a text part of its own; an error is an ``error`` part (``useChat`` shows its ``errorText``,
which starts with the guard's code), then ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mypy_extensions import mypyc_attr

from guardrail.core import jsontext
from guardrail.core.dialect import (
    Ending,
    EventKind,
    Fail,
    FallbackText,
    Framing,
    Kind,
    Ledger,
    Parsed,
    Piece,
    RequestInfo,
    StopReason,
)
from guardrail.core.dialects._events import content_texts, sse_others
from guardrail.core.sse import encode_event

NAME = "vercel_ui"
HEADER = b"x-vercel-ai-ui-message-stream"  # the response header that names this stream
_REASONS = {StopReason.POLICY: "content-filter", StopReason.LENGTH: "length"}
_DONE = encode_event("[DONE]")
# part type: (the field its text is in, the field naming its channel, channel prefix, kind)
_DELTAS = {
    "text-delta": ("delta", "id", "text", Kind.ANSWER),
    "reasoning-delta": ("delta", "id", "reasoning", Kind.REASONING),
    "tool-input-delta": ("inputTextDelta", "toolCallId", "tool", Kind.TOOL),
}
_ENDS = {"text-end": ("id", "text"), "reasoning-end": ("id", "reasoning")}
_STARTS = {"text-start": "text", "reasoning-start": "reasoning"}
# The parts of the protocol (ai 5 and later); others pass as unknown if their strings are clean.
_KNOWN = frozenset(
    (
        "start start-step finish-step finish abort error message-metadata text-start text-end reasoning-start "
        "reasoning-end reasoning-file source-url source-document file custom tool-input-start tool-input-available "
        "tool-input-error tool-approval-request tool-output-available tool-output-error tool-output-denied"
    ).split()
)
_KEYS = frozenset(
    "type id delta toolCallId toolName inputTextDelta input output messageId messageMetadata finishReason "
    "providerMetadata providerExecuted dynamic sourceId url mediaType title filename preliminary".split()
)
FALLBACK_ID = "guardrail-fallback"


@mypyc_attr(allow_interpreted_subclasses=True)
class VercelUI:
    """The UI message stream dialect."""

    name = NAME

    def start(self, framing: Framing, request: RequestInfo | None = None, **options: Any) -> UIMessageStream:
        return UIMessageStream(framing)

    def error_body(self, status: int, code: str, message: str, param: str | None = None) -> bytes:
        # Before the stream starts, useChat reads a failed response's body as the error's text.
        return f"{code}: {message}".encode()

    def prompt_tokens(self, payload: Mapping[str, Any], count: Callable[[str], int]) -> int:
        """The text parts of the UI messages (``messages[].parts``), or their ``content``."""
        total = 0
        for message in payload.get("messages") or ():
            if isinstance(message, dict):
                texts = content_texts(message.get("parts")) or content_texts(message.get("content"))
                total += sum(count(text) for text in texts)
        return total


DIALECT = VercelUI()


@mypyc_attr(allow_interpreted_subclasses=True)
class UIMessageStream:
    """One UI message stream."""

    dialect_name = NAME

    def __init__(self, framing: Framing = Framing.SSE) -> None:
        self.framing = framing
        self.complete = False  # over with its finish part, or [DONE]
        self.hidden: frozenset[Kind] = frozenset()  # kinds withheld (final answer only): their parts left out
        self._open: dict[str, None] = {}  # open text and reasoning parts ("text:ID"), in order
        self._streamed: set[str] = set()  # tool calls whose input came in deltas
        self._step = False  # a step is open (start-step without its finish-step)

    def parse(self, frame: bytes, fields: Any = None) -> Parsed:
        others = sse_others(fields)
        data = getattr(fields, "data", None)
        if data is None:
            return Parsed(EventKind.PASS, frame, others=others)
        if data.strip() == "[DONE]":
            return Parsed(EventKind.END, frame, others=others)
        try:
            obj = jsontext.loads(data)
        except jsontext.Malformed as exc:
            return Parsed(EventKind.MALFORMED, frame, detail=f"a part whose data is {exc}")
        kind = obj.get("type") if type(obj) is dict else None
        if type(kind) is not str:
            return Parsed(EventKind.UNKNOWN, frame, others=(*others, *jsontext.strings(obj)), detail="not a part")
        spec = _DELTAS.get(kind)
        if spec is not None:
            field, name, prefix, channel_kind = spec
            text, ident = obj.get(field), obj.get(name)
            if type(text) is str and type(ident) is str:
                rest = _strings({k: v for k, v in obj.items() if k != field})
                channel = f"{prefix}:{ident}"
                if prefix == "tool":
                    self._streamed.add(ident)
                else:
                    self._open.setdefault(channel, None)
                if not text:
                    return Parsed(EventKind.PASS, frame, others=(*others, *rest), data=obj)
                piece = Piece(channel, text, (field,), channel_kind, prefix == "tool")
                return Parsed(EventKind.TEXT, frame, (piece,), (*others, *rest), data=obj)
        all_strings = (*others, *_strings(obj))
        if self._withheld(kind):
            frame = b""  # a part that only frames withheld text: checked, not sent
        if kind in _ENDS and type(obj.get("id")) is str:
            channel = f"{_ENDS[kind][1]}:{obj['id']}"
            self._open.pop(channel, None)
            return Parsed(EventKind.TEXT, frame, others=all_strings, ends=(channel,), data=obj)
        if kind in _STARTS and type(obj.get("id")) is str:
            self._open.setdefault(f"{_STARTS[kind]}:{obj['id']}", None)
        elif kind == "tool-input-available" and type(obj.get("toolCallId")) is str:
            return self._tool_input(frame, obj, others)
        elif kind == "start-step":
            self._step = True
        elif kind in ("finish-step", "finish"):
            self.complete = self.complete or kind == "finish"
            self._step = self._step and kind != "finish-step"
            # Held text goes out before the step or the message is said to be over.
            return Parsed(EventKind.TEXT, frame, others=all_strings, waits=("",), data=obj)
        elif kind == "error":
            return Parsed(EventKind.ERROR, frame, others=all_strings, data=obj)
        elif kind not in _KNOWN and not kind.startswith("data-"):
            return Parsed(EventKind.UNKNOWN, frame, others=all_strings, detail=f"a part of type {kind!r}")
        return Parsed(EventKind.PASS, frame, others=all_strings, data=obj)

    def _withheld(self, kind: str) -> bool:
        if kind.startswith("reasoning-"):
            return Kind.REASONING in self.hidden
        return kind.startswith("tool-") and Kind.TOOL in self.hidden

    def _tool_input(self, frame: bytes, obj: dict[str, Any], others: tuple[str, ...]) -> Parsed:
        ident = obj["toolCallId"]
        channel = f"tool:{ident}"
        rest = (*others, *_strings({k: v for k, v in obj.items() if k != "input"}))
        if ident in self._streamed:
            # The input was streamed: it is written again from what the client received.
            return Parsed(EventKind.TEXT, frame, (), rest, (channel,), data=obj, derived=True)
        text = jsontext.dumps(obj.get("input"))
        piece = Piece(channel, text, ("input",), Kind.TOOL, True)
        return Parsed(EventKind.TEXT, frame, (piece,), rest, (channel,), data=obj, derived=True)

    def rewrite(self, parsed: Parsed, texts: Mapping[int, str], ledger: Ledger, *, closing: bool = True) -> bytes:
        obj = parsed.data
        if self._withheld(str(obj.get("type"))):
            return b""
        if obj.get("type") == "tool-input-available":
            sent = ledger.sent(f"tool:{obj['toolCallId']}")
            try:
                value = jsontext.loads(sent) if sent else {}
            except jsontext.Malformed:
                return b""  # cut short: the input is not available, the client keeps what it has
            return self._part({**obj, "input": value})
        if not parsed.pieces:
            if not closing and obj.get("type") in _ENDS:
                # Stopped while ending its part: the part is still open at the client.
                self._open[f"{_ENDS[obj['type']][1]}:{obj['id']}"] = None
            return self._part(obj) if closing else b""
        text = texts.get(0, "")
        return self._part({**obj, parsed.pieces[0].path[0]: text}) if text else b""

    def closing(self, parsed: Parsed, ledger: Ledger) -> bytes:
        return parsed.raw

    def text(self, channel: str, text: str) -> bytes:
        prefix, _, ident = channel.partition(":")
        if prefix == "tool":
            return self._part({"type": "tool-input-delta", "toolCallId": ident, "inputTextDelta": text})
        return self._part({"type": f"{prefix}-delta", "id": ident, "delta": text})

    def end(self, ending: Ending | None, ledger: Ledger, parsed: Parsed | None = None) -> bytes:
        if ending is None:
            return parsed.raw if parsed is not None else b""
        if isinstance(ending, Fail):
            return self._part({"type": "error", "errorText": f"{ending.code}: {ending.message}"}) + _DONE
        parts = [
            self._end_part(channel) for channel in self._open if not self._withheld(channel.partition(":")[0] + "-")
        ]
        self._open.clear()
        reason = "stop"
        if isinstance(ending, FallbackText):
            channel = f"text:{FALLBACK_ID}"
            ledger.add(channel, ending.text)
            parts.append(self._part({"type": "text-start", "id": FALLBACK_ID}))
            parts.append(self.text(channel, ending.text))
            parts.append(self._end_part(channel))
        else:
            reason = _REASONS[ending.reason]
        if self._step:
            parts.append(self._part({"type": "finish-step"}))
        parts.append(self._part({"type": "finish", "finishReason": reason}))
        return b"".join(parts) + _DONE

    def _end_part(self, channel: str) -> bytes:
        prefix, _, ident = channel.partition(":")
        return self._part({"type": f"{prefix}-end", "id": ident})

    def _part(self, obj: dict[str, Any]) -> bytes:
        return encode_event(jsontext.dumps(obj))


def _strings(obj: object) -> list[str]:
    """The strings of a part, the protocol's own keys left out."""
    return list(jsontext.strings(obj, skip_keys=_KEYS))
