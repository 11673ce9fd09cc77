"""Anthropic Messages (``POST /v1/messages``), streamed (named SSE events) and whole.

Channels (wire-formats §4.1): each content block is one, by its ``index``: ``text_delta``
(``content[i].text``), ``thinking_delta`` (``content[i].thinking``), ``input_json_delta``
(``content[i].input``, the tool input's JSON text) and the quoted text of ``citations_delta``
(``content[i].citations``). ``content_block_stop`` ends the block's channel; text that still
arrives for it after that is an error. A block's initial text in ``content_block_start``, tool
names, ids and every other string are checked whole. ``ping`` passes.

Endings (§8.4): a stop closes the open blocks and ends with ``message_delta``
(``stop_reason`` ``refusal``, or ``max_tokens`` for a budget, with usage: the helper needs it)
then ``message_stop``; fallback text goes in a new text block and ends with ``end_turn``; an
error is Anthropic's ``error`` event (the SDK raises ``APIStatusError``).
"""

from __future__ import annotations

import uuid
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
    Stop,
    StopReason,
)
from guardrail.core.dialects._events import content_texts, event_object, read_named, reencoded
from guardrail.core.sse import SSEEvent, encode_event

NAME = "anthropic_messages"
_REASONS = {StopReason.POLICY: "refusal", StopReason.LENGTH: "max_tokens"}
# delta type: (its text field, the channel's suffix, kind)
_DELTAS = {
    "text_delta": ("text", "text", Kind.ANSWER),
    "thinking_delta": ("thinking", "thinking", Kind.REASONING),
    "input_json_delta": ("partial_json", "input", Kind.TOOL),
}
_KNOWN_KEYS = frozenset(
    (
        "type index delta content_block message id role model content stop_reason stop_sequence usage text "
        "thinking signature partial_json input name input_tokens output_tokens cache_creation_input_tokens "
        "cache_read_input_tokens citation citations error cited_text document_index document_title "
        "start_char_index end_char_index server_tool_use service_tier"
    ).split()
)
# Each message's share of the prompt the API adds, as chat's format does (an estimate).
TOKENS_PER_MESSAGE = 3


@mypyc_attr(allow_interpreted_subclasses=True)
class AnthropicMessages:
    """The Messages dialect."""

    name = NAME

    def start(self, framing: Framing, request: RequestInfo | None = None, **options: Any) -> MessagesStream:
        return MessagesStream(framing, request.payload if request is not None else None)

    def error_body(self, status: int, code: str, message: str, param: str | None = None) -> bytes:
        kind = "invalid_request_error" if 400 <= status < 500 else "api_error"
        return jsontext.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()

    def prompt_tokens(self, payload: Mapping[str, Any], count: Callable[[str], int]) -> int:
        """``system`` and the text blocks of ``messages``."""
        total = sum(count(text) for text in content_texts(payload.get("system")))
        for message in payload.get("messages") or ():
            if isinstance(message, dict):
                total += TOKENS_PER_MESSAGE + sum(count(text) for text in content_texts(message.get("content")))
        return total


DIALECT = AnthropicMessages()


@mypyc_attr(allow_interpreted_subclasses=True)
class MessagesStream:
    """One Messages answer: an event stream, or a whole message (``Framing.JSON``)."""

    dialect_name = NAME

    def __init__(self, framing: Framing = Framing.SSE, request: Mapping[str, Any] | None = None) -> None:
        self.framing = framing
        self.complete = framing is Framing.JSON  # over with a stop reason, or message_stop
        self._message: dict[str, Any] = {
            "id": f"msg_guardrail_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        if request and isinstance(request.get("model"), str):
            self._message["model"] = request["model"]
        self._open: dict[int, str] = {}  # open block index: its type
        self._blocks: dict[int, str] = {}  # every block started: its type
        self._started = False
        self._body: dict[str, Any] | None = None
        self._offset = 0  # a continuation's block indexes follow the first stream's
        self._continuing = False
        self._closing_first = b""  # a continuation first closes the blocks the first stream left open

    def continuation(self, **options: Any) -> MessagesStream:
        """A stream object for a url fallback's answer, joining this stream.

        The other upstream's ``message_start`` is dropped (the client has one), its blocks follow
        this stream's (indexes shifted), and the blocks this stream left open are closed first.
        """
        child = MessagesStream(Framing.SSE)  # (options such as the ledger: nothing to take from them)
        child._message, child._started, child._continuing = self._message, True, True
        child._offset = max(self._blocks, default=-1) + 1
        child._closing_first = b"".join(
            self._event({"type": "content_block_stop", "index": index}) for index in self._open
        )
        return child

    # -- reading ----------------------------------------------------------------------------

    def parse(self, frame: bytes, fields: Any = None) -> Parsed:
        if self.framing is Framing.JSON:
            return self._parse_body(frame)
        event: SSEEvent = fields
        if self._continuing and event.data is not None:
            frame, event = self._adopt(event)
            if not frame:
                return Parsed(EventKind.PASS, b"")
        read = read_named(frame, event, "a Messages event")
        if isinstance(read, Parsed):
            return read
        obj, sse_others = read
        kind = obj["type"]
        index = obj.get("index")
        if kind == "content_block_delta" and type(index) is int and type(obj.get("delta")) is dict:
            return self._delta(frame, obj, index, sse_others)
        if kind == "content_block_start" and type(index) is int:
            block = obj.get("content_block")
            self._open[index] = self._blocks[index] = str(block.get("type")) if type(block) is dict else ""
            return Parsed(EventKind.PASS, frame, others=(*sse_others, *_others(obj)), data=obj)
        if kind == "content_block_stop" and type(index) is int:
            self._open.pop(index, None)
            ends = tuple(f"content[{index}].{suffix}" for suffix in ("text", "thinking", "input", "citations"))
            return Parsed(EventKind.TEXT, frame, (), (*sse_others, *_others(obj)), ends=ends, data=obj)
        if kind == "message_start":
            self._started = True
            if type(obj.get("message")) is dict:
                self._message = {**obj["message"], "content": []}
            return Parsed(EventKind.PASS, frame, others=(*sse_others, *_others(obj)), data=obj)
        if kind == "message_delta" and type(obj.get("delta")) is dict and obj["delta"].get("stop_reason"):
            self.complete = True
        if kind == "message_stop":
            return Parsed(EventKind.END, frame, others=(*sse_others, *_others(obj)), data=obj)
        if kind == "error":
            return Parsed(EventKind.ERROR, frame, others=(*sse_others, *jsontext.strings(obj)), data=obj)
        if kind == "content_block_delta":
            detail = "a delta for a block that was never started"
            return Parsed(EventKind.MALFORMED, frame, detail=detail)
        return Parsed(EventKind.PASS, frame, others=(*sse_others, *_others(obj)), data=obj)

    def _adopt(self, event: SSEEvent) -> tuple[bytes, SSEEvent]:
        """A fallback answer's event as part of the first stream: no second start, blocks after its own."""
        obj = event_object(event)
        if obj is None:
            return event.raw, event
        first, self._closing_first = self._closing_first, b""
        if obj.get("type") == "message_start":
            return first, SSEEvent(first, None)
        if type(obj.get("index")) is int:
            obj = {**obj, "index": obj["index"] + self._offset}
        return reencoded(obj, event, first)

    def _delta(self, frame: bytes, obj: dict[str, Any], index: int, sse_others: tuple[str, ...]) -> Parsed:
        if index not in self._blocks:
            return Parsed(EventKind.MALFORMED, frame, detail=f"a delta for block {index}, which was never started")
        delta = obj["delta"]
        sse_others = (*sse_others, *_others({key: value for key, value in obj.items() if key != "delta"}))
        spec = _DELTAS.get(str(delta.get("type")))
        if spec is not None and type(delta.get(spec[0])) is str:
            field, suffix, kind = spec
            text = delta[field]
            others = (*sse_others, *_others({k: v for k, v in delta.items() if k != field}))
            piece = Piece(f"content[{index}].{suffix}", text, ("delta", field), kind, suffix == "input")
            pieces = (piece,) if text else ()
            return Parsed(EventKind.TEXT if pieces else EventKind.PASS, frame, pieces, others, data=obj)
        citation = delta.get("citation")
        if (
            delta.get("type") == "citations_delta"
            and type(citation) is dict
            and type(citation.get("cited_text")) is str
        ):
            text = citation["cited_text"]
            others = (*sse_others, *_others({k: v for k, v in citation.items() if k != "cited_text"}))
            piece = Piece(f"content[{index}].citations", text, ("delta", "citation", "cited_text"))
            return Parsed(EventKind.TEXT if text else EventKind.PASS, frame, (piece,) if text else (), others, data=obj)
        return Parsed(EventKind.PASS, frame, others=(*sse_others, *jsontext.strings(delta)), data=obj)

    def _parse_body(self, frame: bytes) -> Parsed:
        try:
            obj = jsontext.loads(frame)
        except jsontext.Malformed as exc:
            return Parsed(EventKind.MALFORMED, frame, detail=f"a body that is {exc}")
        if type(obj) is not dict:
            return Parsed(EventKind.UNKNOWN, frame, others=tuple(jsontext.strings(obj)), detail="not an object")
        if obj.get("type") == "error":
            return Parsed(EventKind.ERROR, frame, others=tuple(jsontext.strings(obj)), data=obj)
        pieces: list[Piece] = []
        others = [s for k, v in obj.items() if k != "content" for s in (k, *jsontext.strings(v))]
        for index, block in enumerate(obj.get("content") or ()):
            if type(block) is not dict:
                others.extend(jsontext.strings(block))
                continue
            for field, suffix, kind in (("text", "text", Kind.ANSWER), ("thinking", "thinking", Kind.REASONING)):
                if type(block.get(field)) is str and block.get("type") == suffix:
                    pieces.append(Piece(f"content[{index}].{suffix}", block[field], ("content", index, field), kind))
            if block.get("type") == "tool_use" and "input" in block:
                text = jsontext.dumps(block["input"])
                pieces.append(Piece(f"content[{index}].input", text, ("content", index, "input"), Kind.TOOL, True))
            others.extend(_others({k: v for k, v in block.items() if k not in ("text", "thinking", "input")}))
        ends = tuple(dict.fromkeys(piece.channel for piece in pieces))
        return Parsed(EventKind.TEXT, frame, tuple(pieces), tuple(others), ends, data=obj, derived=True)

    # -- writing ----------------------------------------------------------------------------

    def rewrite(self, parsed: Parsed, texts: Mapping[int, str], ledger: Ledger, *, closing: bool = True) -> bytes:
        obj = parsed.data
        if self.framing is Framing.JSON:
            replacements: dict[jsontext.Path, object] = {}
            for piece in parsed.pieces:
                text = ledger.sent(piece.channel)
                if piece.path[-1] == "input":
                    try:
                        replacements[piece.path] = jsontext.loads(text) if text else {}
                    except jsontext.Malformed:
                        replacements[piece.path] = {"_partial": text}
                else:
                    replacements[piece.path] = text
            body: dict[str, Any] = jsontext.replace_paths(obj, replacements)
            body = {**body, "usage": self._usage(ledger, body.get("usage"))}
            if not closing:
                self._body = body
                return b""
            return jsontext.dumps(body).encode()
        if not parsed.pieces:
            return self._event(obj)
        text = texts.get(0, "")
        if not text:
            return b""
        return self._event(jsontext.replace_paths(obj, {parsed.pieces[0].path: text}))

    def closing(self, parsed: Parsed, ledger: Ledger) -> bytes:
        return b""

    def text(self, channel: str, text: str) -> bytes:
        index = int(channel[len("content[") : channel.index("]")])
        suffix = channel.rsplit(".", 1)[1]
        if suffix == "citations":
            delta: dict[str, Any] = {
                "type": "citations_delta",
                "citation": {"type": "char_location", "cited_text": text},
            }
        else:
            kind, field = {"text": ("text_delta", "text"), "thinking": ("thinking_delta", "thinking")}.get(
                suffix, ("input_json_delta", "partial_json")
            )
            delta = {"type": kind, field: text}
        return self._event({"type": "content_block_delta", "index": index, "delta": delta})

    def end(self, ending: Ending | None, ledger: Ledger, parsed: Parsed | None = None) -> bytes:
        if self.framing is Framing.JSON:
            return self._end_body(ending, ledger)
        if ending is None:
            return parsed.raw if parsed is not None else b""
        if isinstance(ending, Fail):
            kind = "overloaded_error" if ending.code == "upstream_error" else "api_error"
            return self._event({"type": "error", "error": {"type": kind, "message": ending.coded_message}})
        parts = [] if self._started else [self._event({"type": "message_start", "message": self._message})]
        for index in list(self._open):
            parts.append(self._event({"type": "content_block_stop", "index": index}))
            del self._open[index]
        reason = "end_turn"
        if isinstance(ending, FallbackText):
            index = max(self._blocks, default=-1) + 1
            self._blocks[index] = "text"
            block = {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
            parts.append(self._event(block))
            ledger.add(f"content[{index}].text", ending.text)
            parts.append(self.text(f"content[{index}].text", ending.text))
            parts.append(self._event({"type": "content_block_stop", "index": index}))
        else:
            reason = _REASONS[ending.reason]
        delta = {"stop_reason": reason, "stop_sequence": None}
        usage = self._usage(ledger, None)
        parts.append(
            self._event({"type": "message_delta", "delta": delta, "usage": {"output_tokens": usage["output_tokens"]}})
        )
        parts.append(self._event({"type": "message_stop"}))
        return b"".join(parts)

    def _end_body(self, ending: Ending | None, ledger: Ledger) -> bytes:
        if isinstance(ending, Fail):
            return DIALECT.error_body(502, ending.code, ending.coded_message)
        body = self._body
        if body is None:
            return b""
        if isinstance(ending, Stop):
            body = {**body, "stop_reason": _REASONS[ending.reason], "stop_sequence": None}
        elif isinstance(ending, FallbackText):
            content = [*(body.get("content") or []), {"type": "text", "text": ending.text}]
            body = {**body, "content": content, "stop_reason": "end_turn"}
        return jsontext.dumps(body).encode()

    def _usage(self, ledger: Ledger, given: object) -> dict[str, Any]:
        usage = dict(given) if type(given) is dict else dict(self._message.get("usage") or {})
        completion = ledger.completion_tokens()
        usage["output_tokens"] = completion if completion is not None else usage.get("output_tokens", 0)
        usage.setdefault("input_tokens", ledger.prompt_tokens or 0)
        return usage

    def _event(self, obj: dict[str, Any]) -> bytes:
        return encode_event(jsontext.dumps(obj), event=str(obj.get("type", "")))


def _others(obj: object) -> list[str]:
    """Strings in ``obj``, keys of the API's own structure left out."""
    out: list[str] = []
    stack = [obj]
    while stack:
        node = stack.pop()
        if type(node) is str:
            out.append(node)
        elif type(node) is dict:
            for key, value in node.items():
                if key not in _KNOWN_KEYS:
                    out.append(key)
                stack.append(value)
        elif type(node) is list:
            stack.extend(node)
    return out
