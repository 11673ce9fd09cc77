"""Ollama's native API (``/api/chat``, ``/api/generate``): NDJSON lines, streamed, or one whole object.

Channels (wire-formats §5): ``message.content`` and ``message.thinking`` (chat), ``response``
and ``thinking`` (generate); tool calls arrive whole, each string of their arguments a channel
of its own. The line with ``done: true`` ends the stream. An early stop writes that final line
itself, with ``done_reason`` ``content_filter`` (a policy stop: Ollama has no refusal reason of
its own, and its Python client accepts any string) or ``length`` (a budget, as Ollama's own);
an error is Ollama's ``{"error": ...}`` line, which the client raises as ``ResponseError``.
Lines are written with ASCII escapes: the Python client splits lines on U+2028 and U+0085.
"""

from __future__ import annotations

import json
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
from guardrail.core.dialects._events import spells, whole_strings

NAME = "ollama"
_REASONS = {StopReason.POLICY: "content_filter", StopReason.LENGTH: "length"}
_KNOWN_KEYS = frozenset(
    (
        "model created_at message role content thinking response done done_reason total_duration load_duration "
        "prompt_eval_count prompt_eval_duration eval_count eval_duration context tool_calls function name arguments "
        "images index"
    ).split()
)


@mypyc_attr(allow_interpreted_subclasses=True)
class Ollama:
    """The Ollama dialect."""

    name = NAME

    def start(self, framing: Framing, request: RequestInfo | None = None, **options: Any) -> OllamaStream:
        path = request.path if request is not None else ""
        model = (request.payload or {}).get("model") if request is not None else None
        return OllamaStream(framing, generate=path.rstrip("/").endswith("/generate"), model=model)

    def error_body(self, status: int, code: str, message: str, param: str | None = None) -> bytes:
        return _line({"error": message})

    def prompt_tokens(self, payload: Mapping[str, Any], count: Callable[[str], int]) -> int:
        total = sum(count(payload[key]) for key in ("prompt", "system") if isinstance(payload.get(key), str))
        for message in payload.get("messages") or ():
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                total += count(message["content"])
        return total


DIALECT = Ollama()


def _line(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


@mypyc_attr(allow_interpreted_subclasses=True)
class OllamaStream:
    """One Ollama answer, chat or generate."""

    dialect_name = NAME

    def __init__(self, framing: Framing = Framing.NDJSON, *, generate: bool = False, model: object = None) -> None:
        self.framing = framing
        self.complete = framing is Framing.JSON  # over with its done: true line
        self._generate = generate
        self._head: dict[str, Any] = {"model": model if isinstance(model, str) else "", "created_at": ""}
        self._body: dict[str, Any] | None = None
        self._calls = 0  # tool calls seen: each one's strings get channels of their own
        self._no_logprobs = False  # logprobs were dropped once: they are from then on

    def parse(self, frame: bytes, fields: Any = None) -> Parsed:
        if not frame.strip():
            return Parsed(EventKind.PASS, frame)
        try:
            obj = jsontext.loads(frame)
        except jsontext.Malformed as exc:
            return Parsed(EventKind.MALFORMED, frame, detail=f"a line that is {exc}")
        if type(obj) is not dict:
            return Parsed(EventKind.UNKNOWN, frame, others=tuple(jsontext.strings(obj)), detail="not an object")
        if obj.get("error") is not None:
            return Parsed(EventKind.ERROR, frame, others=tuple(jsontext.strings(obj)), data=obj)
        if not self._head["created_at"]:
            self._head = {"model": obj.get("model", self._head["model"]), "created_at": obj.get("created_at", "")}
        pieces: list[Piece] = []
        others: list[str] = []
        for key, value in obj.items():
            if key not in _KNOWN_KEYS:
                others.append(key)
            if key in ("response", "thinking") and type(value) is str:
                if value:
                    kind = Kind.REASONING if key == "thinking" else Kind.ANSWER
                    pieces.append(Piece(key, value, (key,), kind))
            elif key == "message" and type(value) is dict:
                self._read_message(pieces, others, value)
            else:
                others.extend(jsontext.strings(value))
        whole = self.framing is Framing.JSON
        if obj.get("done") is True:
            self.complete = True
            ends = tuple(dict.fromkeys(piece.channel for piece in pieces))
            if whole:
                return Parsed(EventKind.TEXT, frame, tuple(pieces), tuple(others), ends, data=obj, derived=True)
            if not pieces:
                return Parsed(EventKind.END, frame, others=tuple(others), data=obj)
            calls = tuple(dict.fromkeys(piece.channel for piece in pieces if piece.channel.startswith("tool_call[")))
            return Parsed(EventKind.TEXT, frame, tuple(pieces), tuple(others), calls, data=obj, waits=("",))
        event = EventKind.TEXT if pieces else EventKind.PASS
        calls = tuple(dict.fromkeys(piece.channel for piece in pieces if piece.channel.startswith("tool_call[")))
        # Logprobs that do not spell the line's answer text go out only re-rendered, without them,
        # and none from then on (nor after a line the guard rewrote): joined tokens stay a prefix.
        derived = "logprobs" in obj and (self._no_logprobs or not _spelled(obj))
        self._no_logprobs = self._no_logprobs or derived
        return Parsed(event, frame, tuple(pieces), tuple(others), calls, data=obj, derived=derived)

    def _read_message(self, pieces: list[Piece], others: list[str], message: dict[str, Any]) -> None:
        for key, value in message.items():
            if key not in _KNOWN_KEYS:
                others.append(key)
            if key in ("content", "thinking") and type(value) is str:
                if value:
                    kind = Kind.REASONING if key == "thinking" else Kind.ANSWER
                    pieces.append(Piece(f"message.{key}", value, ("message", key), kind))
            elif key == "tool_calls" and type(value) is list:
                for position, call in enumerate(value):
                    # Each call arrives whole: its strings are channels of their own, ended in this line.
                    self._calls += 1
                    where = ("message", "tool_calls", position)
                    whole_strings(pieces, others, f"tool_call[{self._calls}]", where, call, _KNOWN_KEYS)
            else:
                others.extend(jsontext.strings(value))

    def rewrite(self, parsed: Parsed, texts: Mapping[int, str], ledger: Ledger, *, closing: bool = True) -> bytes:
        obj = parsed.data
        if self.framing is Framing.JSON:
            body = jsontext.replace_paths(obj, {piece.path: ledger.sent(piece.channel) for piece in parsed.pieces})
            if not closing:
                self._body = body
                return b""
            return _line(body)
        replacements: dict[jsontext.Path, object] = {
            piece.path: texts.get(n, "") for n, piece in enumerate(parsed.pieces)
        }
        if "logprobs" in obj:
            replacements[("logprobs",)] = jsontext.DROP  # tokens of the original text
            self._no_logprobs = True
        out = jsontext.replace_paths(obj, replacements)
        if not closing and out.get("done") is True:
            # The final line goes after the held text (see closing): this part carries the text only.
            text = {"response": out.get("response", "")} if self._generate else {"message": out.get("message", {})}
            out = {**self._head, **text, "done": False}
        return _line(out)

    def closing(self, parsed: Parsed, ledger: Ledger) -> bytes:
        final = {**parsed.data}
        if self._generate:
            final["response"] = ""
        else:
            final["message"] = {"role": "assistant", "content": ""}
        return _line(final)

    def text(self, channel: str, text: str) -> bytes:
        if channel in ("response", "thinking"):
            return _line({**self._head, channel: text, "done": False})
        field = channel.removeprefix("message.")
        return _line({**self._head, "message": {"role": "assistant", field: text}, "done": False})

    def end(self, ending: Ending | None, ledger: Ledger, parsed: Parsed | None = None) -> bytes:
        if self.framing is Framing.JSON:
            return self._end_body(ending, ledger)
        if ending is None:
            return parsed.raw if parsed is not None else b""
        if isinstance(ending, Fail):
            return _line({"error": ending.coded_message})
        parts = []
        reason = "stop"
        if isinstance(ending, FallbackText):
            channel = "response" if self._generate else "message.content"
            ledger.add(channel, ending.text)
            parts.append(self.text(channel, ending.text))
        else:
            reason = _REASONS[ending.reason]
        final: dict[str, Any] = {**self._head, "done": True, "done_reason": reason}
        if self._generate:
            final["response"] = ""
        else:
            final["message"] = {"role": "assistant", "content": ""}
        completion = ledger.completion_tokens()
        if completion is not None:
            final["eval_count"] = completion
        parts.append(_line(final))
        return b"".join(parts)

    def _end_body(self, ending: Ending | None, ledger: Ledger) -> bytes:
        if isinstance(ending, Fail):
            return _line({"error": ending.coded_message})
        body = self._body
        if body is None:
            return b""
        if isinstance(ending, Stop):
            body = {**body, "done_reason": _REASONS[ending.reason]}
        elif isinstance(ending, FallbackText):
            if self._generate:
                body = {**body, "response": body.get("response", "") + ending.text}
            else:
                message = dict(body.get("message") or {})
                message["content"] = str(message.get("content", "")) + ending.text
                body = {**body, "message": message}
        return _line(body)


def _spelled(obj: dict[str, Any]) -> bool:
    """Whether a line's logprobs tokens (and bytes) spell exactly its answer text."""
    message = obj.get("message")
    text = obj.get("response") if "response" in obj else message.get("content") if type(message) is dict else None
    logprobs = obj.get("logprobs")
    return type(logprobs) is list and spells(logprobs, text if type(text) is str else "")
