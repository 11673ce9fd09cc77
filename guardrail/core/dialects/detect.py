"""Telling a response's dialect by its first event, where neither the path nor the rule file says.

:class:`DetectingStream` reads the first frame that carries data, picks the dialect whose events
look like it (:func:`dialect_of`), and from then on is that dialect's stream. A first event that
looks like none is read as OpenAI chat, the most common shape; such a stream's text still
reaches no client unchecked (every string outside the dialect's channels is checked whole). A
later event that plainly belongs to another dialect ends the stream as malformed: a client of
that dialect would join text that this one checks only string by string.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from guardrail.core import jsontext
from guardrail.core.dialect import DialectStream, Ending, EventKind, Framing, Ledger, Parsed, RequestInfo
from guardrail.core.dialects._events import sse_others

DEFAULT = "openai_chat"
_ANTHROPIC = frozenset(
    "message_start content_block_start content_block_delta content_block_stop message_delta message_stop ping".split()
)
_UI_PARTS = frozenset(
    "start start-step text-start text-delta reasoning-start reasoning-delta tool-input-start tool-input-delta".split()
)


def dialect_of(obj: object, event: str | None = None) -> str | None:
    """The dialect whose event (or whole body) ``obj`` is, by its shape; None if none is clear."""
    if event is not None and (event in _ANTHROPIC or event.startswith("response.")):
        return "anthropic_messages" if event in _ANTHROPIC else "openai_responses"
    if type(obj) is list:
        return "gemini" if obj and all(type(item) is dict and "candidates" in item for item in obj) else None
    if type(obj) is not dict:
        return None
    kind = obj.get("type")
    if type(kind) is str:
        if kind.startswith("response.") or (kind == "response" and "output" in obj):
            return "openai_responses"
        if kind in _ANTHROPIC or (kind == "message" and "content" in obj):
            return "anthropic_messages"
        if kind in _UI_PARTS or kind.startswith("data-"):
            return "vercel_ui"
    if obj.get("object") == "response":
        return "openai_responses"
    if "candidates" in obj or "promptFeedback" in obj:
        return "gemini"
    choices = obj.get("choices")
    if type(choices) is list:
        completion = obj.get("object") in ("text_completion", "text_completion.chunk") or any(
            type(choice) is dict and "text" in choice and "delta" not in choice and "message" not in choice
            for choice in choices
        )
        return "openai_completions" if completion else "openai_chat"
    if "done" in obj and "model" in obj:
        return "ollama"
    return None


class DetectingStream:
    """A stream whose dialect is told by its first event with data (then it is that dialect's stream)."""

    def __init__(self, framing: Framing, request: RequestInfo | None = None, **options: Any) -> None:
        self.framing = framing
        self._request = request
        self._options = options
        self._stream: DialectStream | None = None
        self.dialect_name = DEFAULT  # until the first event tells

    def _start(self, name: str) -> DialectStream:
        from guardrail.core.dialects import get_dialect

        self._stream = get_dialect(name).start(self.framing, self._request, **self._options)
        self.dialect_name = self._stream.dialect_name
        return self._stream

    def parse(self, frame: bytes, fields: Any = None) -> Parsed:
        data = getattr(fields, "data", None) if self.framing is Framing.SSE else frame
        if data is None or (self.framing is Framing.SSE and not data.strip()):
            if self._stream is None:
                return Parsed(EventKind.PASS, frame, others=sse_others(fields))  # nothing to tell by yet
            return self._stream.parse(frame, fields)
        try:
            obj = jsontext.loads(data)
        except jsontext.Malformed:
            obj = None
        told = dialect_of(obj, getattr(fields, "event", None))
        if self._stream is None:
            return self._start(told or DEFAULT).parse(frame, fields)
        if told is not None and told != self.dialect_name:
            # A client of the other dialect would join text this one checks piece by piece.
            detail = f"a {told} event in a stream read as {self.dialect_name}"
            return Parsed(EventKind.MALFORMED, frame, detail=detail)
        return self._stream.parse(frame, fields)

    def _current(self) -> DialectStream:
        return self._stream if self._stream is not None else self._start(DEFAULT)

    def rewrite(self, parsed: Parsed, texts: Mapping[int, str], ledger: Ledger, *, closing: bool = True) -> bytes:
        return self._current().rewrite(parsed, texts, ledger, closing=closing)

    def closing(self, parsed: Parsed, ledger: Ledger) -> bytes:
        return self._current().closing(parsed, ledger)

    def text(self, channel: str, text: str) -> bytes:
        return self._current().text(channel, text)

    def end(self, ending: Ending | None, ledger: Ledger, parsed: Parsed | None = None) -> bytes:
        return self._current().end(ending, ledger, parsed)

    def outgoing(self, data: bytes) -> bytes:
        outgoing = getattr(self._stream, "outgoing", None)
        return outgoing(data) if outgoing is not None else data

    def __getattr__(self, name: str) -> Any:
        # What only some dialects have (a url fallback's continuation), once the dialect is known.
        if name.startswith("_") or self.__dict__.get("_stream") is None:
            raise AttributeError(name)
        return getattr(self.__dict__["_stream"], name)
