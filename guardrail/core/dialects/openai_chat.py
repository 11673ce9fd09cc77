"""OpenAI Chat Completions, streamed (``chat.completion.chunk`` SSE events) and whole.

Every string a choice's ``delta`` (or whole ``message``) carries is model text on a channel of
its own: ``content`` (a string, or a list of parts whose ``text`` continue it), ``refusal``,
``reasoning_content`` and ``reasoning``, each tool call's ``function.arguments`` and
``function.name`` (arguments sent as an object count as their JSON text), the legacy
``function_call``, ``audio.transcript``, and any other string field a server adds. Strings
elsewhere (``id``, ``model``, logprobs tokens, error messages, SSE ids and comments) go to the
engine as ``others``.

A non-empty ``finish_reason`` waits for the choice's channels: it goes out after their held
text, and text that still follows on the choice continues the same channels. ``""`` and null
are not finishes. When a chunk's text changes, its ``logprobs`` are dropped, so that no token
of held or redacted text goes out that way. Events written by the guard reuse the stream's
``id``, ``created`` and ``model`` (wire-formats §2.2, §8.2).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
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
from guardrail.core.dialects import _openai
from guardrail.core.dialects._events import spells
from guardrail.core.sse import SSEEvent, encode_event

NAME = "openai_chat"
_TEMPLATE_KEYS = ("id", "object", "created", "model", "system_fingerprint")
_DONE = encode_event("[DONE]")
_STOP_REASONS = {StopReason.POLICY: "content_filter", StopReason.LENGTH: "length"}
_REASONING = ("reasoning_content", "reasoning")
_QUICK_PATH = ("choices", 0, "delta", "content")
# A channel name (choices[0].tool_calls[1].function.arguments) read back into keys and indexes.
_NAME_TOKEN = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")
# Keys of the chunk's own structure: no model text in them, so they are not checked as strings.
_KNOWN_KEYS = frozenset(
    (
        "id object created model system_fingerprint service_tier choices usage index delta message role content "
        "refusal logprobs finish_reason tool_calls function arguments name type text audio transcript "
        "reasoning_content reasoning obfuscation"
    ).split()
)


@mypyc_attr(allow_interpreted_subclasses=True)
class OpenAIChat:
    """The Chat Completions dialect (``POST /v1/chat/completions``)."""

    name = NAME

    def start(self, framing: Framing, request: RequestInfo | None = None, **options: Any) -> ChatStream:
        payload = (request.payload if request is not None else None) or {}
        options.setdefault("include_usage", _openai.include_usage(payload))
        if "identity" not in options:
            identity: dict[str, Any] = {
                "id": f"chatcmpl-guardrail-{uuid.uuid4().hex[:24]}",
                "created": request.created if request is not None else 0,
            }
            if isinstance(payload.get("model"), str):
                identity["model"] = payload["model"]
            options["identity"] = identity
        return ChatStream(framing, **options)

    def error_body(self, status: int, code: str, message: str, param: str | None = None) -> bytes:
        return _openai.status_error_body(status, code, message, param)

    def prompt_tokens(self, payload: Mapping[str, Any], count: Any) -> int:
        return _openai.chat_prompt_tokens(payload, count)


DIALECT = OpenAIChat()


@mypyc_attr(allow_interpreted_subclasses=True)
class ChatStream:
    """One chat completion response: a chunk stream (``Framing.SSE``) or a whole body (``Framing.JSON``).

    Args:
        identity: ``id``, ``created`` and ``model`` for chunks written before the stream sent one.
        include_usage: the client asked for ``stream_options.include_usage``: a stream cut short
            (or one that never sent usage) ends with a usage chunk counting what the client got.
        prompt_tokens: the request's prompt tokens, for that chunk.
        continuation: this stream continues one the client already has (a url fallback):
            every chunk takes ``identity``, and role deltas are dropped.
    """

    dialect_name = NAME
    answer_field = "content"  # where a choice's answer text is (a fallback's text goes there)
    chunk_object = "chat.completion.chunk"

    __slots__ = (
        "_altered",
        "_body",
        "_continuation",
        "_has_identity",
        "_owe_usage",
        "_prompt_tokens",
        "_rest",
        "_rest_others",
        "complete",
        "framing",
        "open_choices",
        "template",
    )

    def __init__(
        self,
        framing: Framing = Framing.SSE,
        *,
        identity: Mapping[str, Any] | None = None,
        include_usage: bool = False,
        prompt_tokens: int | None = None,
        continuation: bool = False,
    ) -> None:
        self.framing = framing
        self.template: dict[str, Any] = {"object": self.chunk_object, **(identity or {})}
        self._has_identity = continuation
        self._continuation = continuation
        # Whether the stream has said it is over (a finish reason; [DONE] ends it at once).
        self.complete = framing is Framing.JSON
        self.open_choices: dict[int, None] = {}  # insertion-ordered set
        self._owe_usage = include_usage
        self._prompt_tokens = prompt_tokens
        self._body: dict[str, Any] | None = None  # a whole body, as rewritten, until it goes out
        # Choices whose text the guard changed: their logprobs are dropped from then on, so that
        # the tokens a client joins are always a prefix of the text it got.
        self._altered: tuple[int, ...] = ()  # (a tuple: the smallest set of a few)
        self._rest: dict[str, Any] | None = None  # a chunk without its choices, as last seen
        self._rest_others: tuple[str, ...] = ()

    @property
    def identity(self) -> dict[str, Any]:
        return dict(self.template)

    def continuation(self, **options: Any) -> ChatStream:
        """A stream object for a url fallback's answer, joining this stream."""
        options.pop("ledger", None)  # the chat stream's choices simply go on
        return type(self)(Framing.SSE, identity=self.template, continuation=True, **options)

    # -- reading ----------------------------------------------------------------------------

    def parse(self, frame: bytes, fields: Any = None) -> Parsed:
        if self.framing is Framing.JSON:
            return self._parse_body(frame)
        event: SSEEvent = fields
        sse_others = _openai.sse_others(event)
        data = event.data
        if data is None:
            return Parsed(EventKind.PASS, frame, others=sse_others)
        if data.startswith("[DONE]"):  # the SDK's own test; anything after it is not sent on
            return Parsed(EventKind.END, frame, others=sse_others)
        try:
            obj = jsontext.loads(data)
        except jsontext.Malformed as exc:
            return Parsed(EventKind.MALFORMED, frame, detail=f"an event whose data is {exc}")
        if type(obj) is not dict:
            return Parsed(
                EventKind.UNKNOWN, frame, others=(*sse_others, *jsontext.strings(obj)), detail="not an object"
            )
        if self._continuation:
            obj = self._adopt(obj)
            if obj is None:
                return Parsed(EventKind.PASS, b"")
            frame = encode_event(jsontext.dumps(obj))
        if obj.get("usage"):
            self._owe_usage = False  # the stream's own usage chunk goes out
        if obj.get("error") is not None:
            return Parsed(EventKind.ERROR, frame, others=(*sse_others, *jsontext.strings(obj)), data=obj)
        choices = obj.get("choices")
        if type(choices) is not list:
            others = (*sse_others, *jsontext.strings(obj, skip_keys=_KNOWN_KEYS))
            kind = EventKind.PASS if "choices" in obj or "usage" in obj else EventKind.UNKNOWN
            return Parsed(kind, frame, others=others, data=obj, detail="not a chat completion chunk")
        self._learn_identity(obj)
        obj, frame = self._without_logprobs(obj, choices, frame)
        choices = obj["choices"]
        quick = self._quick(frame, obj, choices, sse_others)
        if quick is not None:
            return quick
        return self._parse_chunk(frame, obj, choices, sse_others, "delta")

    def _quick(
        self, frame: bytes, obj: dict[str, Any], choices: list[Any], sse_others: tuple[str, ...]
    ) -> Parsed | None:
        """The chunk nearly every delta is: one choice, text content only, not finished."""
        if len(choices) != 1:
            return None
        choice = choices[0]
        if type(choice) is not dict or choice.get("finish_reason") or choice.get("logprobs") is not None:
            return None
        delta = choice.get("delta")
        if type(delta) is not dict or len(delta) != 1:
            return None
        content = delta.get("content")
        index = choice.get("index", 0)
        if type(content) is not str or type(index) is not int or len(choice) > 4:
            return None
        if not choice.keys() <= _KNOWN_KEYS:
            return None
        # Everything beside the choice (id, model...) repeats on every chunk: read once, and the
        # same tuple handed back while it does not change, so the engine checks it once.
        rest = obj.copy()
        del rest["choices"]
        if rest != self._rest:
            if rest == self.template:
                rest = self.template  # the identity learned from the first chunk, usually: one copy serves
            found: list[str] = []
            for key, value in rest.items():
                if key not in _KNOWN_KEYS:
                    found.append(key)
                if type(value) is str:
                    found.append(value)
                elif type(value) in (dict, list):
                    found.extend(jsontext.strings(value))
            self._rest, self._rest_others = rest, tuple(found)
        others = (*sse_others, *self._rest_others) if sse_others else self._rest_others
        self.open_choices[index] = None
        pieces = (Piece(f"choices[{index}].content", content, _QUICK_PATH),) if content else ()
        return Parsed(EventKind.TEXT if pieces else EventKind.PASS, frame, pieces, others, data=obj)

    def _parse_chunk(
        self, frame: bytes, obj: dict[str, Any], choices: list[Any], sse_others: tuple[str, ...], field: str
    ) -> Parsed:
        pieces: list[Piece] = []
        others: list[str] = list(sse_others)
        waits: list[str] = []
        for key, value in obj.items():
            if key not in _KNOWN_KEYS:
                others.append(key)
            if key != "choices":
                others.extend(jsontext.strings(value))
        for pos, choice in enumerate(choices):
            if type(choice) is not dict:
                others.extend(jsontext.strings(choice))
                continue
            index = choice.get("index", pos)
            if type(index) is not int:
                index = pos
            self.open_choices[index] = None
            for key, value in choice.items():
                if key == field and type(value) is dict:
                    _read_delta(pieces, others, f"choices[{index}].", ("choices", pos, field), value)
                elif key == "text" and self.answer_field == "text" and type(value) is str:
                    if value:
                        pieces.append(Piece(f"choices[{index}].text", value, ("choices", pos, "text")))
                else:
                    if key not in _KNOWN_KEYS:
                        others.append(key)
                    others.extend(jsontext.strings(value))
            if choice.get("finish_reason"):
                waits.append(f"choices[{index}].")
                self.complete = True
                self.open_choices.pop(index, None)
        ends: tuple[str, ...] = ()
        if self.framing is Framing.JSON:
            ends = tuple(dict.fromkeys(piece.channel for piece in pieces))
        kind = EventKind.TEXT if pieces or waits else EventKind.PASS
        return Parsed(kind, frame, tuple(pieces), tuple(others), ends, tuple(waits), obj)

    def _parse_body(self, frame: bytes) -> Parsed:
        try:
            obj = jsontext.loads(frame)
        except jsontext.Malformed as exc:
            return Parsed(EventKind.MALFORMED, frame, detail=f"a body that is {exc}")
        if type(obj) is not dict:
            return Parsed(EventKind.UNKNOWN, frame, others=tuple(jsontext.strings(obj)), detail="not an object")
        if obj.get("error") is not None:
            return Parsed(EventKind.ERROR, frame, others=tuple(jsontext.strings(obj)), data=obj)
        choices = obj.get("choices")
        if type(choices) is not list:
            return Parsed(EventKind.UNKNOWN, frame, others=tuple(jsontext.strings(obj)), detail="no choices")
        obj, frame = self._without_logprobs(obj, choices, frame)
        parsed = self._parse_chunk(frame, obj, obj["choices"], (), "message")
        return parsed._replace(waits=())

    def _without_logprobs(self, obj: dict[str, Any], choices: list[Any], frame: bytes) -> tuple[dict[str, Any], bytes]:
        """``obj`` without the logprobs of altered choices and of those whose tokens are not the
        chunk's text (the rules read the text), and its bytes; or as it is."""
        drop: dict[jsontext.Path, object] = {}
        for pos, choice in enumerate(choices):
            if type(choice) is dict and choice.get("logprobs") is not None:
                index = choice.get("index", pos)
                index = index if type(index) is int else pos
                if index in self._altered or not self._spelled(choice):
                    # From then on: the tokens a client joins stay a prefix of the choice's text.
                    self._alter(index)
                    drop[("choices", pos, "logprobs")] = None
        if not drop:
            return obj, frame
        obj = jsontext.replace_paths(obj, drop)
        return obj, encode_event(jsontext.dumps(obj))

    def _spelled(self, choice: dict[str, Any]) -> bool:
        """Whether a choice's logprobs tokens (and their bytes) spell exactly its text in this chunk."""
        logprobs, delta = choice.get("logprobs"), choice.get("delta", choice.get("message"))
        if type(logprobs) is not dict or type(delta) is not dict:
            return False
        for kind in ("content", "refusal"):
            entries = logprobs.get(kind)
            if entries is None:
                continue
            text = delta.get(kind)
            if type(entries) is not list or not spells(entries, text if type(text) is str else ""):
                return False
        return True

    def _alter(self, index: int) -> None:
        if index not in self._altered:
            self._altered += (index,)

    def _learn_identity(self, obj: dict[str, Any]) -> None:
        if not self._has_identity and obj.get("id"):
            self.template = {key: obj[key] for key in _TEMPLATE_KEYS if key in obj}
            self.template.setdefault("object", self.chunk_object)
            self._has_identity = True

    def _adopt(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """A continuation's chunk as the first stream carries it: its identity, no role delta, no usage.

        The other upstream's usage counts only its own answer: the guard writes the usage chunk
        at the end instead, counting all the client received (see :meth:`_usage`).
        """
        adopted = {**obj, **{key: value for key, value in self.template.items() if key in _TEMPLATE_KEYS}}
        if adopted.get("usage"):
            adopted["usage"] = None
            if not adopted.get("choices"):
                return None
        choices = adopted.get("choices")
        if type(choices) is not list:
            return adopted
        dropped_role = False
        kept = []
        for choice in choices:
            if type(choice) is dict and type(choice.get("delta")) is dict and "role" in choice["delta"]:
                choice = {**choice, "delta": {k: v for k, v in choice["delta"].items() if k != "role"}}
                dropped_role = True
            kept.append(choice)
        adopted["choices"] = kept
        if dropped_role and not adopted.get("usage") and not any(_carries_something(c) for c in kept):
            return None
        return adopted

    # -- writing ----------------------------------------------------------------------------

    def rewrite(self, parsed: Parsed, texts: Mapping[int, str], ledger: Ledger, *, closing: bool = True) -> bytes:
        obj = parsed.data
        pieces = parsed.pieces
        # The quick path's chunk (one choice, content only, in a stream): rebuilt directly, the
        # common case. (Its path names a delta, which only streams have.)
        if len(pieces) == 1 and pieces[0].path == _QUICK_PATH and len(obj["choices"]) == 1:
            choice: dict[str, Any] = obj["choices"][0]
            if choice.get("logprobs") is None and not choice.get("finish_reason"):
                text = texts.get(0, "")
                if text != pieces[0].text:
                    self._alter(choice.get("index", 0))
                if not text:
                    return b""
                # Written with the text in place of the original, which goes straight back: the
                # event is this stream's own parse, and copying it would cost more than the writing.
                delta: dict[str, Any] = choice["delta"]
                delta["content"] = text
                try:
                    return b"data: " + jsontext.dump_bytes(obj) + b"\n\n"  # (what encode_event writes for one line)
                finally:
                    delta["content"] = pieces[0].text
        replacements: dict[jsontext.Path, object] = {}
        for number, piece in enumerate(parsed.pieces):
            text = texts.get(number, "")
            if text != piece.text:
                replacements[piece.path] = text
                replacements[piece.path[:2] + ("logprobs",)] = None  # tokens of the original text
                self._alter(int(piece.channel[len("choices[") : piece.channel.index("]")]))
        if not closing:  # the finishes go later (see closing()) or never (the guard ends the stream)
            for pos, choice in enumerate(obj["choices"]):
                if type(choice) is dict and choice.get("finish_reason"):
                    replacements[("choices", pos, "finish_reason")] = None
                    index = choice.get("index", pos)
                    self.open_choices[index if type(index) is int else pos] = None
        out = jsontext.replace_paths(obj, replacements)
        if self.framing is Framing.JSON:
            if closing:
                return _body_bytes(out, ledger)
            self._body = out  # the guard ends the answer: end() writes it with its stop reason
            return b""
        if not out.get("usage") and not any(_carries_something(choice) for choice in out["choices"]):
            return b""
        return encode_event(jsontext.dumps(out))

    def closing(self, parsed: Parsed, ledger: Ledger) -> bytes:
        chunks = []
        for pos, choice in enumerate(parsed.data["choices"]):
            if type(choice) is dict and choice.get("finish_reason"):
                index = choice.get("index", pos)
                chunk = {"index": index, "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]}
                chunks.append(self._chunk(chunk))
                self.open_choices.pop(index if type(index) is int else pos, None)
        if not parsed.pieces and not parsed.data.get("usage"):
            return parsed.raw  # a finish chunk and nothing else: as it came
        return b"".join(chunks)

    def text(self, channel: str, text: str) -> bytes:
        tokens: list[tuple[str, str]] = _NAME_TOKEN.findall(channel)
        choice = int(tokens[1][1])  # choices, [n]
        delta: Any = text
        for key, number in reversed(tokens[2:]):
            if key:
                delta = {key: delta}
            elif type(delta) is dict and list(delta) == ["function"]:  # a tool call's own index
                delta = [{"index": int(number), **delta}]
            else:
                delta = [*([None] * int(number)), delta]
        return self._chunk({"index": choice, "delta": delta, "logprobs": None, "finish_reason": None})

    def end(self, ending: Ending | None, ledger: Ledger, parsed: Parsed | None = None) -> bytes:
        if self.framing is Framing.JSON:
            return self._end_body(ending, ledger)
        if isinstance(ending, Fail):
            # The usage asked for goes first: after the error event the SDK reads nothing more. The
            # message names the code too, for clients that keep only the message (litellm).
            message = ending.coded_message
            error = encode_event(jsontext.dumps(_openai.error(message, ending.error_type, ending.code)))
            return self._usage(ledger) + error
        parts = []
        if isinstance(ending, FallbackText):
            for index in list(self.open_choices) or [0]:
                ledger.add(f"choices[{index}].{self.answer_field}", ending.text)
                parts.append(self.text(f"choices[{index}].{self.answer_field}", ending.text))
            parts.append(self._finish_all("stop"))
        elif isinstance(ending, Stop):
            parts.append(self._finish_all(_STOP_REASONS[ending.reason]))
        parts.append(self._usage(ledger))
        if ending is not None or parsed is not None:
            parts.append(_DONE)
        return b"".join(parts)

    def _end_body(self, ending: Ending | None, ledger: Ledger) -> bytes:
        if isinstance(ending, Fail):
            return _openai.error_body(ending.code, ending.message, None, ending.error_type)
        body = self._body
        if body is None:
            return b""
        if isinstance(ending, FallbackText | Stop):
            reason = "stop" if isinstance(ending, FallbackText) else _STOP_REASONS[ending.reason]
            choices = []
            for pos, choice in enumerate(body.get("choices", [])):
                if type(choice) is not dict:
                    continue
                choice = {**choice, "finish_reason": reason, "logprobs": None}
                if isinstance(ending, FallbackText):
                    channel = f"choices[{choice.get('index', pos)}].{self.answer_field}"
                    ledger.add(channel, ending.text)
                    if self.answer_field == "content":
                        choice["message"] = {**(choice.get("message") or {}), "content": ledger.sent(channel)}
                    else:
                        choice[self.answer_field] = ledger.sent(channel)
                choices.append(choice)
            body = {**body, "choices": choices}
        return _body_bytes(body, ledger)

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        return encode_event(jsontext.dumps({**self.template, "choices": [choice]}))

    def _finish_all(self, reason: str) -> bytes:
        choices = list(self.open_choices) or [0]
        self.open_choices.clear()
        return b"".join(
            self._chunk({"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}) for index in choices
        )

    def _usage(self, ledger: Ledger) -> bytes:
        completion = ledger.completion_tokens()
        if not self._owe_usage or completion is None:
            return b""
        self._owe_usage = False
        prompt = self._prompt_tokens or 0
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        return encode_event(jsontext.dumps({**self.template, "choices": [], "usage": usage}))


def _read_delta(
    pieces: list[Piece], others: list[str], prefix: str, path: tuple[Any, ...], delta: dict[str, Any]
) -> None:
    """Find the channel text of one choice's ``delta`` (or whole ``message``)."""
    for key, value in delta.items():
        if key not in _KNOWN_KEYS:
            others.append(key)  # a field name is text too; its value is a channel below
        where = (*path, key)
        if key == "role":
            others.extend(jsontext.strings(value))
        elif type(value) is str:
            if value:
                kind = Kind.REASONING if key in _REASONING else Kind.ANSWER
                pieces.append(Piece(prefix + key, value, where, kind))
        elif key == "content" and type(value) is list:
            for pos, part in enumerate(value):
                text = part.get("text") if type(part) is dict else None
                if type(text) is str:
                    if text:
                        pieces.append(Piece(prefix + "content", text, (*where, pos, "text")))
                    others.extend(jsontext.strings({k: v for k, v in part.items() if k != "text"}))
                else:
                    others.extend(jsontext.strings(part))
        elif key == "tool_calls" and type(value) is list:
            for pos, call in enumerate(value):
                if type(call) is not dict:
                    others.extend(jsontext.strings(call))
                    continue
                tool = call.get("index", pos)
                tool = tool if type(tool) is int else pos
                _read_call(pieces, others, f"{prefix}tool_calls[{tool}].", (*where, pos), call)
        elif key == "function_call" and type(value) is dict:
            _read_call(pieces, others, prefix, where[:-1], {"function": value}, function_key=key)
        elif key == "audio" and type(value) is dict:
            transcript = value.get("transcript")
            if type(transcript) is str and transcript:
                pieces.append(Piece(prefix + "audio.transcript", transcript, (*where, "transcript")))
            others.extend(jsontext.strings({k: v for k, v in value.items() if k != "transcript"}))
        elif type(value) in (dict, list):
            others.extend(jsontext.strings(value))


def _read_call(
    pieces: list[Piece],
    others: list[str],
    prefix: str,
    path: tuple[Any, ...],
    call: dict[str, Any],
    *,
    function_key: str = "function",
) -> None:
    for key, value in call.items():
        if key != "function":
            if key not in _KNOWN_KEYS:
                others.append(key)
            others.extend(jsontext.strings(value))
            continue
        if type(value) is not dict:
            others.extend(jsontext.strings(value))
            continue
        for name, text in value.items():
            where = (*path, function_key, name)
            if name not in ("arguments", "name"):
                others.append(name)
                others.extend(jsontext.strings(text))
                continue
            if type(text) in (dict, list):  # arguments sent as an object: each string in it is a channel
                _read_leaves(pieces, others, f"{prefix}{function_key}.{name}", where, text)
            elif type(text) is str:
                if text:
                    json_text = name == "arguments"  # JSON the client parses; a name is plain text
                    pieces.append(Piece(f"{prefix}{function_key}.{name}", text, where, Kind.TOOL, json_text))
            elif text is not None:
                others.extend(jsontext.strings(text))


def _read_leaves(pieces: list[Piece], others: list[str], channel: str, path: tuple[Any, ...], value: object) -> None:
    """The strings inside a JSON value, each a channel named by where it sits; keys go to ``others``."""
    stack: list[tuple[str, tuple[Any, ...], object]] = [(channel, path, value)]
    while stack:
        name, where, node = stack.pop()
        if type(node) is str:
            if node:
                pieces.append(Piece(name, node, where, Kind.TOOL))
        elif type(node) is dict:
            others.extend(node)
            stack.extend((f"{name}.{key}", (*where, key), child) for key, child in node.items())
        elif type(node) is list:
            stack.extend((f"{name}[{pos}]", (*where, pos), child) for pos, child in enumerate(node))


def _body_bytes(body: dict[str, Any], ledger: Ledger) -> bytes:
    usage = body.get("usage")
    completion = ledger.completion_tokens()
    if type(usage) is dict and completion is not None:
        given = usage.get("prompt_tokens")
        prompt = given if type(given) is int else ledger.prompt_tokens or 0
        body = {**body, "usage": {**usage, "completion_tokens": completion, "total_tokens": prompt + completion}}
    return jsontext.dumps(body).encode()


def _carries_something(choice: object) -> bool:
    """Whether a chunk's choice says anything: a finish reason, or a delta value other than null or empty."""
    if type(choice) is not dict:
        return False
    if choice.get("finish_reason") or choice.get("text"):
        return True
    delta = choice.get("delta")
    if type(delta) is not dict:
        return False
    for key, value in delta.items():
        if key == "tool_calls" and type(value) is list:
            if any(_call_carries_something(call) for call in value):
                return True
        elif key == "content" and type(value) is list:
            if any(type(part) is dict and part.get("text") for part in value):
                return True
        elif value not in (None, "", {}):
            return True
    return False


def _call_carries_something(call: object) -> bool:
    if type(call) is not dict:
        return False
    if call.get("id") or call.get("type"):
        return True
    function = call.get("function")
    return type(function) is dict and any(value not in (None, "") for value in function.values())
