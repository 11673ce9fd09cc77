"""Google Gemini (``models/{m}:streamGenerateContent?alt=sse`` and ``:generateContent``).

Every event is ``data: <GenerateContentResponse>`` (wire-formats §6.1); there is no ``[DONE]``:
the chunk whose candidate carries ``finishReason`` is its last, and the body's end ends the
stream. Channels, per candidate ``i``: its text parts (``candidates[i].text``), its thought
parts (``candidates[i].thought``, reasoning), and each string of a ``functionCall`` (calls
arrive whole, so each string is a channel of its own, ended in its chunk). Other strings
(safety ratings, citations, code the model ran and its output, usage) are checked whole.
``logprobsResult`` repeats the text token by token: it is dropped from a candidate from the
first chunk whose text the guard changed.

Endings (§8.5): a stop is one last chunk with ``finishReason`` ``SAFETY`` (``MAX_TOKENS`` for a
budget) and usage; fallback text is a text chunk, then ``STOP``; an error is Gemini's
``{"error": {...}}`` event, which google-genai raises as ``ClientError``/``ServerError``, with
the guard's code as the ``reason`` of a ``google.rpc.ErrorInfo`` detail. No SSE comments go
out: google-genai fails on them. Without ``alt=sse`` the stream endpoint answers one JSON
array of chunks: read whole, like ``:generateContent``'s single object.
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
    Stop,
    StopReason,
)
from guardrail.core.dialects._events import sse_others, whole_strings
from guardrail.core.sse import encode_event

NAME = "gemini"
_REASONS = {StopReason.POLICY: "SAFETY", StopReason.LENGTH: "MAX_TOKENS"}
# Google's canonical error status for an HTTP code (google.rpc.Code), for the guard's errors.
_STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 413: "INVALID_ARGUMENT", 500: "INTERNAL"}
_STATUS.update({502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"})
# The guard's error codes, as the HTTP code of the error event.
_FAIL_STATUS = {"idle_timeout": 504, "first_token_timeout": 504, "upstream_error": 502}
_DERIVED = ("logprobsResult", "avgLogprobs")  # repeat the text: dropped once the text changed
_KNOWN_KEYS = frozenset(
    (
        "candidates content role parts text thought thoughtSignature index finishReason safetyRatings category "
        "probability blocked usageMetadata promptTokenCount candidatesTokenCount totalTokenCount "
        "thoughtsTokenCount cachedContentTokenCount promptTokensDetails candidatesTokensDetails modality "
        "tokenCount modelVersion responseId createTime functionCall name args id citationMetadata citations "
        "startIndex endIndex uri finishMessage promptFeedback blockReason probabilityScore severity severityScore"
    ).split()
)


@mypyc_attr(allow_interpreted_subclasses=True)
class Gemini:
    """The Gemini dialect."""

    name = NAME

    def start(self, framing: Framing, request: RequestInfo | None = None, **options: Any) -> GeminiStream:
        path = request.path if request is not None else ""
        model = path.rsplit("/", 1)[-1].split(":", 1)[0] if ":" in path else ""
        return GeminiStream(framing, model=model)

    def error_body(self, status: int, code: str, message: str, param: str | None = None) -> bytes:
        return jsontext.dumps(_error(status, code, message)).encode()

    def prompt_tokens(self, payload: Mapping[str, Any], count: Callable[[str], int]) -> int:
        """The text parts of ``contents`` and ``systemInstruction``."""
        contents = payload.get("contents")
        messages = contents if isinstance(contents, list) else [contents]
        messages = [*messages, payload.get("systemInstruction")]
        total = 0
        for message in messages:
            parts = message.get("parts") if isinstance(message, dict) else None
            for part in parts if isinstance(parts, list) else ():
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += count(part["text"])
        return total


DIALECT = Gemini()


def _error(status: int, code: str, message: str) -> dict[str, Any]:
    detail = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": code, "domain": "guardrail"}
    status_name = _STATUS.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
    return {"error": {"code": status, "message": message, "status": status_name, "details": [detail]}}


@mypyc_attr(allow_interpreted_subclasses=True)
class GeminiStream:
    """One Gemini answer: an event stream, or a whole body (one response, or an array of them)."""

    dialect_name = NAME

    def __init__(self, framing: Framing = Framing.SSE, *, model: str = "") -> None:
        self.framing = framing
        self.complete = framing is Framing.JSON  # over once a candidate carries its finishReason
        self.hidden: frozenset[Kind] = frozenset()  # kinds withheld (final answer only): their parts left out
        self._head: dict[str, Any] = {"modelVersion": model} if model else {}
        self._seen: dict[int, None] = {}  # candidate indexes, in order
        self._finished: set[int] = set()
        self._changed: set[int] = set()  # candidates whose text the guard changed: no more logprobs
        self._calls = 0
        self._body: object = None

    # -- reading ----------------------------------------------------------------------------

    def parse(self, frame: bytes, fields: Any = None) -> Parsed:
        if self.framing is Framing.JSON:
            return self._parse_body(frame)
        others = sse_others(fields)
        data = getattr(fields, "data", None)
        if data is None:
            return Parsed(EventKind.PASS, frame, others=others)
        try:
            obj = jsontext.loads(data)
        except jsontext.Malformed as exc:
            return Parsed(EventKind.MALFORMED, frame, detail=f"an event whose data is {exc}")
        if type(obj) is not dict:
            return Parsed(EventKind.UNKNOWN, frame, others=(*others, *jsontext.strings(obj)), detail="not an object")
        if "error" in obj:
            return Parsed(EventKind.ERROR, frame, others=(*others, *jsontext.strings(obj)), data=obj)
        pieces: list[Piece] = []
        other_strings = list(others)
        waits: list[str] = []
        calls: list[str] = []
        derived = self._read(obj, (), pieces, other_strings, waits, calls)
        kind = EventKind.TEXT if pieces or waits else EventKind.PASS
        return Parsed(kind, frame, tuple(pieces), tuple(other_strings), tuple(calls), tuple(waits), obj, "", derived)

    def _read(
        self,
        obj: dict[str, Any],
        at: tuple[Any, ...],
        pieces: list[Piece],
        others: list[str],
        waits: list[str],
        calls: list[str],
    ) -> bool:
        """Read one response object (at ``at`` in the body); True if it repeats changed text."""
        if not self._head.get("responseId"):
            self._head = {k: obj[k] for k in ("modelVersion", "responseId") if type(obj.get(k)) is str} or self._head
        derived = False
        for key, value in obj.items():
            if key not in _KNOWN_KEYS:
                others.append(key)
            if key == "promptFeedback" and type(value) is dict and value.get("blockReason"):
                self.complete = True  # a blocked prompt: the whole answer, with no candidates
            if key != "candidates" or type(value) is not list:
                others.extend(jsontext.strings(value, skip_keys=_KNOWN_KEYS))
                continue
            for position, candidate in enumerate(value):
                if type(candidate) is not dict:
                    others.extend(jsontext.strings(candidate))
                    continue
                index = candidate.get("index", position)
                index = index if type(index) is int else position
                self._seen.setdefault(index, None)
                where = (*at, "candidates", position)
                for name, field in candidate.items():
                    if name not in _KNOWN_KEYS:
                        others.append(name)
                    if name == "content" and type(field) is dict:
                        self._read_content(index, where, field, pieces, others, calls)
                    elif name in _DERIVED:
                        others.extend(jsontext.strings(field, skip_keys=_KNOWN_KEYS))
                        derived = derived or index in self._changed
                    else:
                        others.extend(jsontext.strings(field, skip_keys=_KNOWN_KEYS))
                if "logprobsResult" in candidate and (index in self._changed or not _tokens_match(candidate)):
                    # Tokens that are not this chunk's text: never passed on (the rules read the
                    # text), and none from then on, so that joined tokens stay a prefix of it.
                    self._changed.add(index)
                    value[position] = {k: v for k, v in candidate.items() if k not in _DERIVED}
                    derived = True
                reason = candidate.get("finishReason")
                if type(reason) is str and reason and reason != "FINISH_REASON_UNSPECIFIED":
                    self._finished.add(index)
                    self.complete = True
                    waits.append(f"candidates[{index}].")
        return derived

    def _read_content(
        self,
        index: int,
        where: tuple[Any, ...],
        content: dict[str, Any],
        pieces: list[Piece],
        others: list[str],
        calls: list[str],
    ) -> None:
        for key, value in content.items():
            if key not in _KNOWN_KEYS:
                others.append(key)
            if key != "parts" or type(value) is not list:
                others.extend(jsontext.strings(value, skip_keys=_KNOWN_KEYS))
                continue
            for number, part in enumerate(value):
                if type(part) is not dict:
                    others.extend(jsontext.strings(part))
                    continue
                path = (*where, "content", "parts", number)
                for name, field in part.items():
                    if name not in _KNOWN_KEYS:
                        others.append(name)
                    if name == "text" and type(field) is str:
                        if field:
                            thought = part.get("thought") is True
                            channel = f"candidates[{index}].{'thought' if thought else 'text'}"
                            pieces.append(
                                Piece(channel, field, (*path, "text"), Kind.REASONING if thought else Kind.ANSWER)
                            )
                    elif name == "functionCall":
                        # A call arrives whole: each of its strings is a channel, ended here.
                        self._calls += 1
                        channel = f"candidates[{index}].call[{self._calls}]"
                        before = len(pieces)
                        whole_strings(pieces, others, channel, (*path, name), field, _KNOWN_KEYS)
                        calls.extend(piece.channel for piece in pieces[before:])
                    else:
                        others.extend(jsontext.strings(field, skip_keys=_KNOWN_KEYS))

    def _parse_body(self, frame: bytes) -> Parsed:
        try:
            obj = jsontext.loads(frame)
        except jsontext.Malformed as exc:
            return Parsed(EventKind.MALFORMED, frame, detail=f"a body that is {exc}")
        items = obj if type(obj) is list else [obj]
        if not all(type(item) is dict for item in items):
            return Parsed(EventKind.UNKNOWN, frame, others=tuple(jsontext.strings(obj)), detail="not a response")
        if any("error" in item for item in items):
            return Parsed(EventKind.ERROR, frame, others=tuple(jsontext.strings(obj)), data=obj)
        pieces: list[Piece] = []
        others: list[str] = []
        for position, item in enumerate(items):
            self._read(item, (position,) if type(obj) is list else (), pieces, others, [], [])
        ends = tuple(dict.fromkeys(piece.channel for piece in pieces))
        return Parsed(EventKind.TEXT, frame, tuple(pieces), tuple(others), ends, data=obj, derived=True)

    # -- writing ----------------------------------------------------------------------------

    def rewrite(self, parsed: Parsed, texts: Mapping[int, str], ledger: Ledger, *, closing: bool = True) -> bytes:
        if self.framing is Framing.JSON:
            return self._rewrite_body(parsed, ledger, closing)
        replacements: dict[jsontext.Path, object] = {}
        for number, piece in enumerate(parsed.pieces):
            text = texts.get(number, "")
            if text != piece.text:
                self._changed.add(_candidate(piece.channel))
            replacements[piece.path] = text
            if piece.kind in self.hidden:
                replacements[_part_path(piece.path)] = jsontext.DROP  # withheld: not even an empty part
        obj = jsontext.replace_paths(parsed.data, replacements)
        obj = self._without(obj, self._changed, () if closing else ("finishReason", "finishMessage"))
        if not closing and not parsed.pieces:
            return b""
        return self._event(obj)

    def _without(self, obj: dict[str, Any], changed: set[int], keys: tuple[str, ...]) -> dict[str, Any]:
        """``obj`` without ``keys`` on its candidates, nor what repeats text on those ``changed``."""
        candidates = obj.get("candidates")
        if type(candidates) is not list:
            return obj
        out = []
        for position, candidate in enumerate(candidates):
            if type(candidate) is dict:
                index = candidate.get("index", position)
                drop = (*keys, *_DERIVED) if index in changed else keys
                candidate = {key: value for key, value in candidate.items() if key not in drop}
            out.append(candidate)
        return {**obj, "candidates": out}

    def closing(self, parsed: Parsed, ledger: Ledger) -> bytes:
        obj = parsed.data
        candidates = []
        for position, candidate in enumerate(obj.get("candidates") or ()):
            if type(candidate) is dict:
                kept = {key: value for key, value in candidate.items() if key != "content" and key not in _DERIVED}
                candidates.append({"content": {"role": "model", "parts": []}, "index": position, **kept})
        return self._event({**obj, "candidates": candidates})

    def text(self, channel: str, text: str) -> bytes:
        part: dict[str, Any] = {"text": text}
        if channel.endswith(".thought"):
            part["thought"] = True
        candidate = {"content": {"role": "model", "parts": [part]}, "index": _candidate(channel)}
        return self._event({"candidates": [candidate], **self._head})

    def end(self, ending: Ending | None, ledger: Ledger, parsed: Parsed | None = None) -> bytes:
        if self.framing is Framing.JSON:
            return self._end_body(ending, ledger)
        if ending is None:
            return b""  # no end marker: the body's end is the stream's
        if isinstance(ending, Fail):
            status = _FAIL_STATUS.get(ending.code, 500)
            return self._event(_error(status, ending.code, ending.message))
        parts = []
        reason = "STOP"
        if isinstance(ending, FallbackText):
            ledger.add("candidates[0].text", ending.text)
            parts.append(self.text("candidates[0].text", ending.text))
        else:
            reason = _REASONS[ending.reason]
        open_ = [index for index in self._seen or {0: None} if index not in self._finished] or [0]
        candidates = [{"content": {"role": "model", "parts": []}, "finishReason": reason, "index": i} for i in open_]
        parts.append(self._event({"candidates": candidates, "usageMetadata": _usage(ledger), **self._head}))
        return b"".join(parts)

    def _rewrite_body(self, parsed: Parsed, ledger: Ledger, closing: bool) -> bytes:
        replacements: dict[jsontext.Path, object] = {}
        placed: set[str] = set()
        changed: set[int] = set()
        for piece in parsed.pieces:
            # A channel's text, as the client may have it, goes in its first part; the rest are emptied.
            sent = "" if piece.channel in placed else ledger.sent(piece.channel)
            placed.add(piece.channel)
            replacements[piece.path] = sent
            if sent != piece.text:
                changed.add(_candidate(piece.channel))
            if piece.kind in self.hidden:
                replacements[_part_path(piece.path)] = jsontext.DROP
        obj = jsontext.replace_paths(parsed.data, replacements)
        items = obj if type(obj) is list else [obj]
        items = [self._without(item, changed, ()) for item in items]
        self._body = items if type(obj) is list else items[0]
        if not closing:
            return b""
        body, self._body = self._body, None
        return jsontext.dumps(body).encode()

    def _end_body(self, ending: Ending | None, ledger: Ledger) -> bytes:
        if isinstance(ending, Fail):
            return DIALECT.error_body(_FAIL_STATUS.get(ending.code, 500), ending.code, ending.message)
        body = self._body
        if body is None:
            return b""
        items: list[Any] = list(body) if type(body) is list else [body]
        last = dict(items[-1]) if items and type(items[-1]) is dict else {}
        given: list[Any] = last.get("candidates") or [{}]
        candidates = [dict(candidate) for candidate in given if type(candidate) is dict] or [{}]
        if isinstance(ending, Stop):
            for candidate in candidates:
                candidate["finishReason"] = _REASONS[ending.reason]
        elif isinstance(ending, FallbackText):
            content = dict(candidates[0].get("content") or {"role": "model"})
            content["parts"] = [*(content.get("parts") or []), {"text": ending.text}]
            candidates[0].update(content=content, finishReason="STOP")
        last["candidates"] = candidates
        if ending is not None:
            last["usageMetadata"] = _usage(ledger)
        items[-1:] = [last]
        return jsontext.dumps(items if type(body) is list else items[0]).encode()

    def _event(self, obj: dict[str, Any]) -> bytes:
        return encode_event(jsontext.dumps(obj))


def _tokens_match(candidate: dict[str, Any]) -> bool:
    """Whether a candidate's logprobs tokens spell exactly the text of its answer parts."""
    chosen = (candidate.get("logprobsResult") or {}).get("chosenCandidates")
    content = candidate.get("content")
    parts = content.get("parts") if type(content) is dict else None
    if type(chosen) is not list or type(parts) is not list:
        return False
    tokens = [entry.get("token") if type(entry) is dict else None for entry in chosen]
    texts = [p.get("text") for p in parts if type(p) is dict and "text" in p and p.get("thought") is not True]
    return all(type(t) is str for t in (*tokens, *texts)) and "".join(tokens) == "".join(texts)  # type: ignore[arg-type]


def _part_path(path: tuple[Any, ...]) -> tuple[Any, ...]:
    """The path of the part a piece's path leads into (``...parts, n``)."""
    at = len(path) - 1 - path[::-1].index("parts")
    return path[: at + 2]


def _candidate(channel: str) -> int:
    return int(channel[len("candidates[") : channel.index("]")])


def _usage(ledger: Ledger) -> dict[str, int]:
    prompt = ledger.prompt_tokens or 0
    completion = ledger.completion_tokens() or 0
    return {"promptTokenCount": prompt, "candidatesTokenCount": completion, "totalTokenCount": prompt + completion}
