"""The OpenAI Chat Completions stream: which events carry text, and how to write new ones.

Text lives in three places per choice: ``delta.content``, ``delta.refusal`` and each tool
call's ``function.arguments``; each is a channel of its own, guarded separately. Everything
else (role chunks, finish chunks, usage chunks, comments, ``[DONE]``) carries no text and
passes through. Events written by the guard reuse the stream's ``id``, ``created`` and
``model`` (wire-formats §2.2, §8.2) and are serialised compactly with ``ensure_ascii`` so
U+2028 and friends never reach a line-splitting client raw.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from guardrail.core.sse import SSEEvent, encode_event

DIALECT = "openai_chat"
_TEMPLATE_KEYS = ("id", "object", "created", "model", "system_fingerprint")


class EventKind(enum.Enum):
    PASS = "pass"  # no text: forward as is
    UNKNOWN = "unknown"  # valid JSON, but not a chat completion chunk: forward as is
    CHUNK = "chunk"  # a chunk with text pieces and/or finished choices
    DONE = "done"  # data: [DONE]
    ERROR = "error"  # an in-stream error object from the app or upstream
    MALFORMED = "malformed"  # data that is not JSON


class Channel(NamedTuple):
    """Where text lives: ``choice``'s content, refusal, or the arguments of tool call ``tool``.

    Internal values built on every delta are named tuples: cheaper to build and to hash than
    frozen dataclasses, which shows on the per-delta path.
    """

    choice: int
    kind: str  # "content" | "refusal" | "arguments"
    tool: int = 0

    def __str__(self) -> str:
        if self.kind == "arguments":
            return f"choices[{self.choice}].tool_calls[{self.tool}].function.arguments"
        return f"choices[{self.choice}].{self.kind}"


class Piece(NamedTuple):
    """One channel's text in one chunk, with where it sits in the chunk's JSON."""

    channel: Channel
    text: str
    where: tuple[int, ...]  # (choice position) or (choice position, tool call position)


class ParsedEvent(NamedTuple):
    kind: EventKind
    event: SSEEvent
    pieces: tuple[Piece, ...] = ()
    finished: tuple[int, ...] = ()  # choice indexes whose finish_reason is set
    obj: dict[str, Any] | None = None


def _add_pieces(pieces: list[Piece], choice_pos: int, index: int, delta: Mapping[str, Any]) -> None:
    content = delta.get("content")
    if content and isinstance(content, str):
        pieces.append(Piece(Channel(index, "content"), content, (choice_pos,)))
    refusal = delta.get("refusal")
    if refusal and isinstance(refusal, str):
        pieces.append(Piece(Channel(index, "refusal"), refusal, (choice_pos,)))
    tool_calls = delta.get("tool_calls")
    if tool_calls and isinstance(tool_calls, list):
        for tool_pos, call in enumerate(tool_calls):
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if arguments and isinstance(arguments, str):
                tool = call.get("index", tool_pos)
                channel = Channel(index, "arguments", tool if isinstance(tool, int) else tool_pos)
                pieces.append(Piece(channel, arguments, (choice_pos, tool_pos)))


def parse(event: SSEEvent) -> ParsedEvent:
    """Classify one SSE event of an OpenAI chat stream and find its text."""
    data = event.data
    if data is None:
        return ParsedEvent(EventKind.PASS, event)
    if data.startswith("[DONE]"):  # the SDK's own test
        return ParsedEvent(EventKind.DONE, event)
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            obj = json.loads(data)  # accepts what orjson refuses, such as a lone surrogate escape
        except ValueError:
            return ParsedEvent(EventKind.MALFORMED, event)
    if not isinstance(obj, dict):
        return ParsedEvent(EventKind.UNKNOWN, event)
    if obj.get("error"):
        return ParsedEvent(EventKind.ERROR, event, obj=obj)
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return ParsedEvent(EventKind.UNKNOWN, event, obj=obj)
    if len(choices) == 1:
        quick = _content_delta(event, obj, choices[0])
        if quick is not None:
            return quick
    return _chunk(event, obj, choices)


def _chunk(event: SSEEvent, obj: dict[str, Any], choices: list[Any]) -> ParsedEvent:
    pieces: list[Piece] = []
    finished: list[int] = []
    for pos, choice in enumerate(choices):
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", pos)
        if not isinstance(index, int):
            index = pos
        delta = choice.get("delta")
        if delta and isinstance(delta, dict):
            _add_pieces(pieces, pos, index, delta)
        if choice.get("finish_reason") is not None:
            finished.append(index)
    if not pieces and not finished:
        return ParsedEvent(EventKind.PASS, event, obj=obj)
    return ParsedEvent(EventKind.CHUNK, event, tuple(pieces), tuple(finished), obj)


_CONTENT_CHANNELS = tuple(Channel(index, "content") for index in range(8))


def _content_delta(event: SSEEvent, obj: dict[str, Any], choice: object) -> ParsedEvent | None:
    """The chunk nearly every delta is: one choice, text content and no other text, not finished.

    The general path (:func:`_chunk`) would find the same, with twice the work. None otherwise.
    """
    if type(choice) is not dict or choice.get("finish_reason") is not None:
        return None
    delta = choice.get("delta")
    if type(delta) is not dict or len(delta) != 1 and (delta.get("refusal") or delta.get("tool_calls")):
        return None
    content = delta.get("content")
    index = choice.get("index", 0)
    if type(content) is not str or not content or type(index) is not int or not 0 <= index < len(_CONTENT_CHANNELS):
        return None
    return ParsedEvent(EventKind.CHUNK, event, (Piece(_CONTENT_CHANNELS[index], content, (0,)),), (), obj)


# Line separators a client may split lines on (wire-formats §1.7, §5): written as \u escapes,
# which can only stand inside JSON strings, the one place non-ASCII appears in JSON.
_LINE_SEPARATORS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"), (b"\xc2\x85", b"\\u0085"))


def dumps(obj: object) -> str:
    """Compact JSON for the wire; line separators escaped."""
    try:
        data = orjson.dumps(obj)
    except orjson.JSONEncodeError:  # a lone surrogate: only the standard library writes it (escaped)
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":"))
    if not data.isascii():
        for raw, escaped in _LINE_SEPARATORS:
            data = data.replace(raw, escaped)
    return data.decode()


class ChatRenderer:
    """Writes events for one stream, reusing the identity (``id``, ``created``, ``model``) of its chunks."""

    def __init__(self, identity: Mapping[str, Any] | None = None) -> None:
        self.template: dict[str, Any] = {"object": "chat.completion.chunk", **(identity or {})}
        self._has_identity = False
        self.open_choices: dict[int, None] = {}  # insertion-ordered set

    def observe(self, parsed: ParsedEvent) -> None:
        """Learn the stream's identity and which choices are open from an incoming chunk."""
        obj = parsed.obj
        if obj is None or parsed.kind is not EventKind.CHUNK and parsed.kind is not EventKind.PASS:
            return
        if not self._has_identity and obj.get("id"):
            self.template = {key: obj[key] for key in _TEMPLATE_KEYS if key in obj}
            self.template.setdefault("object", "chat.completion.chunk")
            self._has_identity = True
        choices = obj.get("choices")
        if isinstance(choices, list):
            for pos, choice in enumerate(choices):
                if isinstance(choice, dict):
                    index = choice.get("index", pos)
                    self.open_choices[index if isinstance(index, int) else pos] = None
        for index in parsed.finished:
            self.open_choices.pop(index, None)

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        return encode_event(dumps({**self.template, "choices": [choice]}))

    def text(self, channel: Channel, text: str) -> bytes:
        """A chunk carrying ``text`` on ``channel``."""
        if channel.kind == "arguments":
            delta: dict[str, Any] = {"tool_calls": [{"index": channel.tool, "function": {"arguments": text}}]}
        else:
            delta = {channel.kind: text}
        return self._chunk({"index": channel.choice, "delta": delta, "logprobs": None, "finish_reason": None})

    def finish(self, reason: str) -> bytes:
        """Finish chunks, one per open choice (wire-formats §8.2), with ``reason``."""
        choices = list(self.open_choices) or [0]
        self.open_choices.clear()
        return b"".join(
            self._chunk({"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}) for index in choices
        )

    def fallback(self, text: str) -> bytes:
        """``text`` on the content channel of every open choice, then finish them with ``stop``."""
        choices = list(self.open_choices) or [0]
        chunks = [self.text(Channel(index, "content"), text) for index in choices]
        return b"".join(chunks) + self.finish("stop")

    def rewrite(self, parsed: ParsedEvent, texts: Mapping[int, str], *, keep_finish: bool = True) -> bytes | None:
        """``parsed`` with piece ``i``'s text replaced by ``texts[i]``; None if nothing is left to send."""
        assert parsed.obj is not None
        # Copy only along the paths that change: the parsed event is never modified.
        choices = [dict(choice) if isinstance(choice, dict) else choice for choice in parsed.obj["choices"]]
        obj = {**parsed.obj, "choices": choices}
        for number, piece in enumerate(parsed.pieces):
            text = texts.get(number, "")
            choice = choices[piece.where[0]]
            delta = choice["delta"] = dict(choice["delta"])
            if piece.channel.kind == "arguments":
                calls = delta["tool_calls"] = list(delta["tool_calls"])
                call = calls[piece.where[1]] = dict(calls[piece.where[1]])
                call["function"] = {**call["function"], "arguments": text}
            else:
                delta[piece.channel.kind] = text
        if not keep_finish:
            for choice in choices:
                if isinstance(choice, dict) and choice.get("finish_reason") is not None:
                    choice["finish_reason"] = None
        if not any(carries_something(choice) for choice in choices) and not obj.get("usage"):
            return None
        return encode_event(dumps(obj))

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The usage chunk a stream with ``stream_options.include_usage`` ends with (before ``[DONE]``)."""
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return encode_event(dumps({**self.template, "choices": [], "usage": usage}))

    @staticmethod
    def done() -> bytes:
        return encode_event("[DONE]")

    @staticmethod
    def error(message: str, *, type: str, code: str) -> bytes:
        """An in-stream error object: the openai SDK raises ``APIError`` with this message and code."""
        return encode_event(dumps({"error": {"message": message, "type": type, "param": None, "code": code}}))


def carries_something(choice: object) -> bool:
    """Whether a chunk's choice says anything: a finish reason, or a delta value other than null or empty."""
    if not isinstance(choice, dict):
        return False
    if choice.get("finish_reason") is not None:
        return True
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return False
    for key, value in delta.items():
        if key == "tool_calls" and isinstance(value, list):
            if any(_call_carries_something(call) for call in value):
                return True
        elif value not in (None, ""):
            return True
    return False


def _call_carries_something(call: object) -> bool:
    if not isinstance(call, dict):
        return False
    if call.get("id") or call.get("type"):
        return True
    function = call.get("function")
    return isinstance(function, dict) and any(value not in (None, "") for value in function.values())
