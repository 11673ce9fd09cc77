"""OpenAI Responses (``POST /v1/responses``), streamed (``event:`` + ``data:`` SSE) and whole.

Channels (wire-formats §3.2): ``response.output_text.delta`` (``output[i].content[j].text``),
``response.refusal.delta`` (``…refusal``), ``response.function_call_arguments.delta``
(``output[i].arguments``), ``response.custom_tool_call_input.delta`` (``output[i].input``),
``response.reasoning_summary_text.delta`` (``output[i].summary[k].text``),
``response.reasoning_text.delta`` (``output[i].content[j].reasoning``),
``response.code_interpreter_call_code.delta`` (``output[i].code``) and
``response.audio.transcript.delta`` (``audio.transcript``).

Every event that repeats text (``*.done``, ``content_part.done``, ``output_item.done``, and
the final ``response.completed`` / ``incomplete`` / ``failed``) ends its channels and is
re-rendered with the text the client received. A text in such an event for a channel that never
streamed is checked whole. Strings the response merely echoes from the request (``instructions``,
tool definitions, metadata) are the client's own and are not checked. Sequence numbers are
renumbered on the way out so that they stay strictly increasing whatever the guard adds.

Endings (§8.3): a policy or length stop closes what is open (``status: "incomplete"``) and ends
with ``response.incomplete`` (``content_filter`` / ``max_output_tokens``); fallback text goes on
the open text part (or a new message) and ends with ``response.completed``; an error is the
dual-shape ``error`` event, then ``response.failed``.
"""

from __future__ import annotations

import re
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
from guardrail.core.dialects import _openai
from guardrail.core.dialects._events import event_object, read_named, reencoded, spells
from guardrail.core.sse import SSEEvent, encode_event

NAME = "openai_responses"
_REASONS = {StopReason.POLICY: "content_filter", StopReason.LENGTH: "max_output_tokens"}
_TERMINAL = ("response.completed", "response.incomplete", "response.failed")
_SEQUENCE = re.compile(rb'(?<!\\)"sequence_number":\s*(-?\d+)')


# delta event type: (the field its .done event repeats the text in, kind, channel name from the event)
def _content(suffix: str) -> Callable[[dict[str, Any]], str]:
    return lambda event: f"output[{event.get('output_index', 0)}].content[{event.get('content_index', 0)}].{suffix}"


def _item(suffix: str) -> Callable[[dict[str, Any]], str]:
    return lambda event: f"output[{event.get('output_index', 0)}].{suffix}"


def _summary(event: dict[str, Any]) -> str:
    return f"output[{event.get('output_index', 0)}].summary[{event.get('summary_index', 0)}].text"


_DELTAS: dict[str, tuple[str, Kind, Callable[[dict[str, Any]], str]]] = {
    "response.output_text.delta": ("text", Kind.ANSWER, _content("text")),
    "response.refusal.delta": ("refusal", Kind.ANSWER, _content("refusal")),
    "response.function_call_arguments.delta": ("arguments", Kind.TOOL, _item("arguments")),
    "response.custom_tool_call_input.delta": ("input", Kind.TOOL, _item("input")),
    "response.reasoning_summary_text.delta": ("text", Kind.REASONING, _summary),
    "response.reasoning_text.delta": ("text", Kind.REASONING, _content("reasoning")),
    "response.code_interpreter_call_code.delta": ("code", Kind.TOOL, _item("code")),
    "response.audio.transcript.delta": ("transcript", Kind.ANSWER, lambda event: "audio.transcript"),
}
_DONES = {
    name.removesuffix(".delta") + ".done": (field, kind, channel) for name, (field, kind, channel) in _DELTAS.items()
}
# Keys of the API's own structure: not model text.
_KNOWN_KEYS = frozenset(
    (
        "type sequence_number item_id output_index content_index summary_index delta text logprobs obfuscation "
        "response id object created_at status error incomplete_details model output usage item part annotations "
        "role content summary arguments name call_id input code refusal transcript reason message param "
        "input_tokens output_tokens total_tokens input_tokens_details output_tokens_details cached_tokens "
        "reasoning_tokens token bytes top_logprobs logprob"
    ).split()
)


@mypyc_attr(allow_interpreted_subclasses=True)
class OpenAIResponses:
    """The Responses dialect."""

    name = NAME

    def start(self, framing: Framing, request: RequestInfo | None = None, **options: Any) -> ResponsesStream:
        if request is None:
            return ResponsesStream(framing)
        return ResponsesStream(framing, request.payload, created=request.created)

    def error_body(self, status: int, code: str, message: str, param: str | None = None) -> bytes:
        return _openai.status_error_body(status, code, message, param)

    def prompt_tokens(self, payload: Mapping[str, Any], count: Callable[[str], int]) -> int:
        """``instructions`` and the text of ``input`` (a string, or messages with text content)."""
        total = 0
        for text in (payload.get("instructions"),):
            if isinstance(text, str):
                total += count(text)
        given = payload.get("input")
        if isinstance(given, str):
            return total + count(given) + _openai.TOKENS_REPLY_PRIMING
        for item in given if isinstance(given, list) else ():
            if isinstance(item, dict):
                total += _openai.TOKENS_PER_MESSAGE + sum(count(t) for t in _input_texts(item.get("content")))
        return total + _openai.TOKENS_REPLY_PRIMING


def _input_texts(content: object) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


DIALECT = OpenAIResponses()


@mypyc_attr(allow_interpreted_subclasses=True)
class ResponsesStream:
    """One Responses answer: an event stream, or a whole ``response`` object (``Framing.JSON``)."""

    dialect_name = NAME

    def __init__(
        self, framing: Framing = Framing.SSE, request: Mapping[str, Any] | None = None, *, created: int = 0
    ) -> None:
        self.framing = framing
        self.complete = framing is Framing.JSON  # a stream is over only with its terminal event
        self._no_logprobs: set[str] = set()  # channels whose logprobs were dropped: from then on
        self._echo = frozenset(jsontext.strings(request)) if request else frozenset()
        self._response: dict[str, Any] = {
            "id": f"resp_guardrail_{uuid.uuid4().hex[:24]}",
            "object": "response",
            "created_at": created,
            "status": "in_progress",
            "error": None,
            "incomplete_details": None,
            "output": [],
            "usage": None,
        }
        if request and isinstance(request.get("model"), str):
            self._response["model"] = request["model"]
        self._items: dict[int, dict[str, Any]] = {}  # output index: the item as the client has it
        self._open_items: dict[int, None] = {}
        self._open_parts: dict[tuple[int, int], str] = {}  # (output, content) index: part type
        self._last_sequence = -1
        self._body: dict[str, Any] | None = None
        self._channels: set[str] = set()  # channels whose deltas streamed
        self._offset = 0  # a continuation's output indexes follow the first stream's
        self._continuing = False
        self._closing_first = b""  # a continuation first closes what the first stream left open
        self._seen_parts: dict[tuple[int, int], str] = {}  # every content part added: its type

    # -- reading ----------------------------------------------------------------------------

    def continuation(self, ledger: Ledger | None = None, **options: Any) -> ResponsesStream:
        """A stream object for a url fallback's answer, joining this response.

        The parts and items this stream left open are closed first (``incomplete``, with the text
        the client received); the other upstream's lifecycle events before its output are
        dropped, its output items follow this stream's (indexes shifted), and its final event
        carries this response's id and every item the client received.
        """
        child = ResponsesStream(Framing.SSE)
        if ledger is not None:
            child._closing_first = self._close_open(ledger, "incomplete")
        child._echo, child._response, child._last_sequence = self._echo, self._response, self._last_sequence
        child._items = dict(self._items)
        child._offset = max(self._items, default=-1) + 1
        child._continuing = True
        return child

    def _adopt(self, event: SSEEvent) -> tuple[bytes, SSEEvent]:
        """A fallback answer's event as part of this response."""
        obj = event_object(event)
        if obj is None:
            return event.raw, event
        first, self._closing_first = self._closing_first, b""
        if obj.get("type") in ("response.created", "response.in_progress", "response.queued"):
            return first, SSEEvent(first, None)
        if type(obj.get("output_index")) is int:
            obj = {**obj, "output_index": obj["output_index"] + self._offset}
        obj = self._distinct_ids(obj)
        response = obj.get("response")
        if type(response) is dict:
            obj = {**obj, "response": {**response, "id": self._response.get("id", response.get("id"))}}
        return reencoded(obj, event, first)

    def _distinct_ids(self, obj: dict[str, Any]) -> dict[str, Any]:
        """``obj`` with the fallback's item ids renamed where they repeat the first stream's."""
        taken = {str(item.get("id")) for index, item in self._items.items() if index < self._offset}

        def fresh(value: object) -> object:
            return f"{value}_fallback" if isinstance(value, str) and value in taken else value

        if "item_id" in obj:
            obj = {**obj, "item_id": fresh(obj["item_id"])}
        if type(obj.get("item")) is dict:
            obj = {**obj, "item": {**obj["item"], "id": fresh(obj["item"].get("id"))}}
        response = obj.get("response")
        if type(response) is dict and type(response.get("output")) is list:
            output = [
                {**item, "id": fresh(item.get("id"))} if type(item) is dict else item for item in response["output"]
            ]
            obj = {**obj, "response": {**response, "output": output}}
        return obj

    def parse(self, frame: bytes, fields: Any = None) -> Parsed:
        if self.framing is Framing.JSON:
            return self._parse_body(frame)
        event: SSEEvent = fields
        if self._continuing and event.data is not None:
            frame, event = self._adopt(event)
            if not frame:
                return Parsed(EventKind.PASS, b"")
        read = read_named(frame, event, "a Responses event")
        if isinstance(read, Parsed):
            return read
        obj, sse_others = read
        kind = obj["type"]
        delta = _DELTAS.get(kind)
        if delta is not None:
            text = obj.get("delta")
            others = (*sse_others, *self._others(obj, skip=("delta",)))
            if type(text) is not str:
                return Parsed(EventKind.PASS, frame, others=(*others, *jsontext.strings(text)), data=obj)
            piece = Piece(delta[2](obj), text, ("delta",), delta[1], kind == "response.function_call_arguments.delta")
            self._channels.add(piece.channel)
            # Logprobs that do not spell the delta go out only re-rendered, without them, and none
            # on the channel from then on (nor after a delta the guard rewrote).
            logprobs = obj.get("logprobs")
            spelled = type(logprobs) is list and spells(logprobs, text)
            derived = bool(logprobs) and (piece.channel in self._no_logprobs or not spelled)
            if derived:
                self._no_logprobs.add(piece.channel)
            return Parsed(EventKind.TEXT, frame, (piece,) if text else (), others, data=obj, derived=derived)
        done = _DONES.get(kind)
        if done is not None:
            field, _, channel = done
            name = channel(obj)
            others = (*sse_others, *self._others(obj, skip=(field,)))
            return Parsed(EventKind.TEXT, frame, (), others, ends=(name,), data=obj, derived=True)
        if kind == "error" or obj.get("error") is not None and kind not in _TERMINAL:
            return Parsed(EventKind.ERROR, frame, others=(*sse_others, *jsontext.strings(obj)), data=obj)
        self._learn(obj)
        if kind in _TERMINAL:
            return Parsed(EventKind.END, frame, others=(*sse_others, *self._snapshot_others(obj)), data=obj)
        if "response" in obj or "item" in obj or "part" in obj:
            others = (*sse_others, *self._snapshot_others(obj))
            return Parsed(EventKind.TEXT, frame, (), others, data=obj, derived=True)
        return Parsed(EventKind.PASS, frame, others=(*sse_others, *self._others(obj, skip=())), data=obj)

    def _parse_body(self, frame: bytes) -> Parsed:
        try:
            obj = jsontext.loads(frame)
        except jsontext.Malformed as exc:
            return Parsed(EventKind.MALFORMED, frame, detail=f"a body that is {exc}")
        if type(obj) is not dict:
            return Parsed(EventKind.UNKNOWN, frame, others=tuple(jsontext.strings(obj)), detail="not an object")
        if obj.get("error") is not None and obj.get("object") != "response":
            return Parsed(EventKind.ERROR, frame, others=tuple(jsontext.strings(obj)), data=obj)
        pieces: list[Piece] = []
        others: list[str] = []
        for index, item in enumerate(obj.get("output") or ()):
            for channel, path, text, kind in _item_texts(index, item):
                pieces.append(Piece(channel, text, ("output", index, *path), kind, channel.endswith(".arguments")))
        skip = {piece.path for piece in pieces}
        others.extend(s for s in _strings_outside(obj, skip) if s not in self._echo)
        ends = tuple(dict.fromkeys(piece.channel for piece in pieces))
        return Parsed(EventKind.TEXT, frame, tuple(pieces), tuple(others), ends, data=obj, derived=True)

    def _others(self, obj: dict[str, Any], skip: tuple[str, ...]) -> list[str]:
        out = []
        for key, value in obj.items():
            if key in skip:
                continue
            if key not in _KNOWN_KEYS:
                out.append(key)
            out.extend(s for s in jsontext.strings(value) if s not in self._echo)
        return out

    def _snapshot_others(self, obj: dict[str, Any]) -> list[str]:
        """Strings of a snapshot event outside the channel texts that streamed (those are re-rendered)."""
        out: list[str] = []
        skip: set[tuple[Any, ...]] = set()
        for path, item_index, item in _items_in(obj):
            for channel, rest, _, _ in _item_texts(item_index, item):
                if channel in self._channels:
                    skip.add((*path, *rest))
        out.extend(s for s in _strings_outside(obj, skip) if s not in self._echo)
        return out

    def _learn(self, obj: dict[str, Any]) -> None:
        kind = obj["type"]
        if (
            kind in ("response.created", "response.in_progress", "response.queued")
            and type(obj.get("response")) is dict
        ):
            self._response = {**obj["response"], "output": []}
        elif kind == "response.output_item.added" and type(obj.get("item")) is dict:
            index = obj.get("output_index", len(self._items))
            self._items[index] = dict(obj["item"])
            self._open_items[index] = None
        elif kind == "response.output_item.done":
            self._open_items.pop(obj.get("output_index", -1), None)
        elif kind == "response.content_part.added" and type(obj.get("part")) is dict:
            where = (obj.get("output_index", 0), obj.get("content_index", 0))
            self._open_parts[where] = self._seen_parts[where] = str(obj["part"].get("type"))
        elif kind == "response.content_part.done":
            self._open_parts.pop((obj.get("output_index", 0), obj.get("content_index", 0)), None)

    # -- writing ----------------------------------------------------------------------------

    def rewrite(self, parsed: Parsed, texts: Mapping[int, str], ledger: Ledger, *, closing: bool = True) -> bytes:
        obj = parsed.data
        if self.framing is Framing.JSON:
            body = self._with_client_text(obj, ledger)
            if any(ledger.sent(piece.channel) != piece.text for piece in parsed.pieces):
                body["usage"] = _usage(ledger) or body.get("usage")  # what the client got, not the model
            if not closing:
                self._body = body
                return b""
            return jsontext.dumps(body).encode()
        kind = obj["type"]
        # Logprobs repeat the original text token by token: never written again with other text.
        no_logprobs: dict[str, Any] = {"logprobs": []} if "logprobs" in obj else {}
        if kind in _DELTAS:
            if no_logprobs:
                self._no_logprobs.add(parsed.pieces[0].channel if parsed.pieces else "")
            text = texts.get(0, "")
            return self._event({**obj, "delta": text, **no_logprobs}) if text else b""
        if kind in _DONES:
            field, _, channel = _DONES[kind]
            return self._event({**obj, field: ledger.sent(channel(obj)), **no_logprobs})
        return self._event(self._with_client_text(obj, ledger))

    def closing(self, parsed: Parsed, ledger: Ledger) -> bytes:
        return b""

    def text(self, channel: str, text: str) -> bytes:
        kind, output, content, summary = _channel_parts(channel)
        event: dict[str, Any] = {"type": kind, "sequence_number": 0}
        if kind != "response.audio.transcript.delta":
            event.update(item_id=self._items.get(output, {}).get("id", ""), output_index=output)
            if summary is not None:
                event["summary_index"] = summary
            elif content is not None:
                event["content_index"] = content
        event["delta"] = text
        if kind == "response.output_text.delta":
            event["logprobs"] = []
        return self._event(event)

    def outgoing(self, data: bytes) -> bytes:
        """Every event's ``sequence_number`` strictly above the one before it."""
        if self.framing is not Framing.SSE:
            return data

        def renumber(match: re.Match[bytes]) -> bytes:
            number = int(match.group(1))
            if number <= self._last_sequence:
                number = self._last_sequence + 1
            self._last_sequence = number
            return b'"sequence_number":%d' % number

        return _SEQUENCE.sub(renumber, data)

    def end(self, ending: Ending | None, ledger: Ledger, parsed: Parsed | None = None) -> bytes:
        if self.framing is Framing.JSON:
            return self._end_body(ending, ledger)
        if ending is None:
            if parsed is None:
                return b""
            final = self._with_client_text(parsed.data, ledger)
            if self._continuing and type(final.get("response")) is dict:
                final = {**final, "response": {**final["response"], "output": self._output()}}
            return self._event(final)
        if isinstance(ending, Fail):
            error = {"type": ending.error_type, "code": ending.code, "message": ending.message, "param": None}
            flat = {"type": "error", "sequence_number": 0, **{k: v for k, v in error.items() if k != "type"}}
            failed = {
                **self._response,
                "status": "failed",
                "output": self._output(),
                "error": {"code": "server_error", "message": ending.message},
            }
            # The nested "error" makes openai-python raise; the flat fields serve the documented schema.
            return self._event({**flat, "error": error}) + self._event(
                {"type": "response.failed", "sequence_number": 0, "response": failed}
            )
        parts = []
        if isinstance(ending, FallbackText):
            parts.append(self._fallback(ending.text, ledger))
        status = "completed" if isinstance(ending, FallbackText) else "incomplete"
        parts.append(self._close_open(ledger, status))
        response = {**self._response, "status": status, "output": self._output()}
        if isinstance(ending, Stop):
            response["incomplete_details"] = {"reason": _REASONS[ending.reason]}
            kind = "response.incomplete"
        else:
            kind = "response.completed"
        response["usage"] = _usage(ledger)
        parts.append(self._event({"type": kind, "sequence_number": 0, "response": response}))
        return b"".join(parts)

    def _fallback(self, text: str, ledger: Ledger) -> bytes:
        open_text = next(((o, c) for (o, c), kind in self._open_parts.items() if kind == "output_text"), None)
        parts = []
        if open_text is None:
            index = max(self._items, default=-1) + 1
            item = {
                "id": f"msg_guardrail_{uuid.uuid4().hex[:16]}",
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self._items[index] = item
            self._open_items[index] = None
            self._open_parts[(index, 0)] = "output_text"
            part = {"type": "output_text", "text": "", "annotations": []}
            parts.append(
                self._event(
                    {"type": "response.output_item.added", "sequence_number": 0, "output_index": index, "item": item}
                )
            )
            parts.append(
                self._event(
                    {
                        "type": "response.content_part.added",
                        "sequence_number": 0,
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "part": part,
                    }
                )
            )
            open_text = (index, 0)
        channel = f"output[{open_text[0]}].content[{open_text[1]}].text"
        ledger.add(channel, text)
        parts.append(self.text(channel, text))
        return b"".join(parts)

    def _close_open(self, ledger: Ledger, status: str) -> bytes:
        """``*.done`` events for every open part and item, with the text the client received."""
        parts = []
        for (output, content), kind in list(self._open_parts.items()):
            item_id = self._items.get(output, {}).get("id", "")
            where = {"item_id": item_id, "output_index": output, "content_index": content}
            if kind in ("output_text", "refusal"):
                field = "text" if kind == "output_text" else "refusal"
                channel = f"output[{output}].content[{content}].{field}"
                text = ledger.sent(channel)
                done = {
                    "type": f"response.{'output_text' if kind == 'output_text' else 'refusal'}.done",
                    "sequence_number": 0,
                    **where,
                    field: text,
                }
                if kind == "output_text":
                    done["logprobs"] = []
                parts.append(self._event(done))
                part = {"type": kind, field: text, **({"annotations": []} if kind == "output_text" else {})}
                parts.append(
                    self._event({"type": "response.content_part.done", "sequence_number": 0, **where, "part": part})
                )
            del self._open_parts[(output, content)]
        for output in list(self._open_items):
            item = self._item_with_client_text(output, ledger, status)
            parts.append(
                self._event(
                    {"type": "response.output_item.done", "sequence_number": 0, "output_index": output, "item": item}
                )
            )
            del self._open_items[output]
        return b"".join(parts)

    def _item_with_client_text(self, output: int, ledger: Ledger, status: str) -> dict[str, Any]:
        item = dict(self._items.get(output, {}))
        item["status"] = status
        if item.get("type") == "message":
            content = []
            for (o, c), kind in sorted(self._seen_parts.items()):
                if o != output:
                    continue
                field = "text" if kind == "output_text" else "refusal"
                part: dict[str, Any] = {"type": kind, field: ledger.sent(f"output[{o}].content[{c}].{field}")}
                if kind == "output_text":
                    part["annotations"] = []
                content.append(part)
            item["content"] = content
        elif item.get("type") == "function_call":
            item["arguments"] = ledger.sent(f"output[{output}].arguments")
        self._items[output] = item
        return item

    def _output(self) -> list[dict[str, Any]]:
        return [self._items[index] for index in sorted(self._items)]

    def _with_client_text(self, obj: dict[str, Any], ledger: Ledger) -> dict[str, Any]:
        """``obj`` with every channel text in it replaced by what the client received of it."""
        replacements: dict[jsontext.Path, object] = {}
        for path, item_index, item in _items_in(obj):
            for channel, rest, _, _ in _item_texts(item_index, item):
                if channel in self._channels or self.framing is Framing.JSON:
                    replacements[(*path, *rest)] = ledger.sent(channel)
        out: dict[str, Any] = jsontext.replace_paths(obj, replacements)
        for path, item_index, item in _items_in(out):
            if path and path[-1] == "item":
                self._items[item_index] = item
        return out

    def _event(self, obj: dict[str, Any]) -> bytes:
        return encode_event(jsontext.dumps(obj), event=str(obj.get("type", "")))

    def _end_body(self, ending: Ending | None, ledger: Ledger) -> bytes:
        if isinstance(ending, Fail):
            return _openai.error_body(ending.code, ending.message, None, ending.error_type)
        body = self._body
        if body is None:
            return b""
        if isinstance(ending, Stop):
            body = {**body, "status": "incomplete", "incomplete_details": {"reason": _REASONS[ending.reason]}}
        elif isinstance(ending, FallbackText):
            output = list(body.get("output") or [])
            output.append(
                {
                    "id": f"msg_guardrail_{uuid.uuid4().hex[:16]}",
                    "type": "message",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": ending.text, "annotations": []}],
                }
            )
            body = {**body, "status": "completed", "output": output}
        return jsontext.dumps({**body, "usage": _usage(ledger) or body.get("usage")}).encode()


def _usage(ledger: Ledger) -> dict[str, Any] | None:
    completion = ledger.completion_tokens()
    if completion is None:
        return None
    prompt = ledger.prompt_tokens or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _items_in(obj: dict[str, Any]) -> list[tuple[tuple[Any, ...], int, dict[str, Any]]]:
    """The output items in an event or response: (path to the item, its output index, the item)."""
    found: list[tuple[tuple[Any, ...], int, dict[str, Any]]] = []
    if type(obj.get("item")) is dict:
        found.append((("item",), obj.get("output_index", 0), obj["item"]))
    response = obj.get("response") if type(obj.get("response")) is dict else obj if "output" in obj else None
    prefix: tuple[Any, ...] = ("response",) if response is not obj else ()
    for index, item in enumerate((response or {}).get("output") or ()):
        if type(item) is dict:
            found.append(((*prefix, "output", index), index, item))
    if type(obj.get("part")) is dict:
        part = obj["part"]
        kind = part.get("type")
        field = (
            "text"
            if kind in ("output_text", "summary_text", "reasoning_text")
            else "refusal"
            if kind == "refusal"
            else None
        )
        if field is not None:
            wrapper = {"type": "message", "content": []}
            found.append(((), obj.get("output_index", 0), {**wrapper, "_part": (obj, field)}))
    return found


def _item_texts(index: int, item: object) -> list[tuple[str, tuple[Any, ...], str, Kind]]:
    """The channel texts in one output item: (channel, path in the item, text, kind)."""
    if type(item) is not dict:
        return []
    found: list[tuple[str, tuple[Any, ...], str, Kind]] = []
    if "_part" in item:  # a content_part / summary_part event's part
        event, field = item["_part"]
        part = event["part"]
        if part.get("type") == "summary_text":
            channel = f"output[{index}].summary[{event.get('summary_index', 0)}].text"
        elif part.get("type") == "reasoning_text":
            channel = f"output[{index}].content[{event.get('content_index', 0)}].reasoning"
        else:
            channel = f"output[{index}].content[{event.get('content_index', 0)}].{field}"
        if type(part.get(field)) is str:
            found.append((channel, ("part", field), part[field], Kind.ANSWER))
        return found
    kind = item.get("type")
    for position, part in enumerate(item.get("content") or ()):
        if type(part) is not dict:
            continue
        if part.get("type") == "output_text" and type(part.get("text")) is str:
            found.append(
                (f"output[{index}].content[{position}].text", ("content", position, "text"), part["text"], Kind.ANSWER)
            )
        elif part.get("type") == "refusal" and type(part.get("refusal")) is str:
            found.append(
                (
                    f"output[{index}].content[{position}].refusal",
                    ("content", position, "refusal"),
                    part["refusal"],
                    Kind.ANSWER,
                )
            )
        elif part.get("type") == "reasoning_text" and type(part.get("text")) is str:
            found.append(
                (
                    f"output[{index}].content[{position}].reasoning",
                    ("content", position, "text"),
                    part["text"],
                    Kind.REASONING,
                )
            )
    for position, part in enumerate(item.get("summary") or ()):
        if type(part) is dict and type(part.get("text")) is str:
            found.append(
                (
                    f"output[{index}].summary[{position}].text",
                    ("summary", position, "text"),
                    part["text"],
                    Kind.REASONING,
                )
            )
    for field in ("arguments", "input", "code"):
        if kind != "message" and type(item.get(field)) is str:
            found.append((f"output[{index}].{field}", (field,), item[field], Kind.TOOL))
    return found


def _strings_outside(obj: object, skip: set[tuple[Any, ...]]) -> list[str]:
    out: list[str] = []
    stack: list[tuple[tuple[Any, ...], object]] = [((), obj)]
    while stack:
        path, node = stack.pop()
        if path in skip:
            continue
        if type(node) is str:
            out.append(node)
        elif type(node) is dict:
            for key, value in node.items():
                if key not in _KNOWN_KEYS:
                    out.append(key)
                stack.append(((*path, key), value))
        elif type(node) is list:
            stack.extend(((*path, position), value) for position, value in enumerate(node))
    return out


def _channel_parts(channel: str) -> tuple[str, int, int | None, int | None]:
    """A channel name read back: its delta event type, output index, content index, summary index."""
    if channel == "audio.transcript":
        return "response.audio.transcript.delta", 0, None, None
    numbers = [int(n) for n in re.findall(r"\[(\d+)\]", channel)]
    output = numbers[0]
    if ".summary[" in channel:
        return "response.reasoning_summary_text.delta", output, None, numbers[1]
    if channel.endswith(".refusal"):
        return "response.refusal.delta", output, numbers[1], None
    if channel.endswith(".reasoning"):
        return "response.reasoning_text.delta", output, numbers[1], None
    if channel.endswith(".text"):
        return "response.output_text.delta", output, numbers[1], None
    field = channel.rsplit(".", 1)[1]
    kind = {"arguments": "response.function_call_arguments.delta", "input": "response.custom_tool_call_input.delta"}
    return kind.get(field, "response.code_interpreter_call_code.delta"), output, None, None
