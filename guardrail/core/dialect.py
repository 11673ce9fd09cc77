"""What the engine knows of a provider's wire format: the dialect interface.

The engine (:mod:`guardrail.core.engine`) keeps rules, hold-back and release; it knows no
provider. A :class:`Dialect` is stateless and registered by name; for each response it starts
a :class:`DialectStream`, which reads the response's frames (SSE blocks, NDJSON lines, or one
whole JSON body: see :class:`Framing`) into :class:`Parsed` events and writes every byte the
guard adds or changes: re-rendered events, text released late, and each :data:`Ending`.

Channels are named by the dialect (``choices[0].content``, ``content[1].text``...): each is one
text, checked on its own, from its first piece to the end of the stream. An event may *end*
channels (they can never continue: ``content_block_stop``, ``response.output_text.done``) or
*wait* for them (it goes out only once they hold nothing back: a chat finish chunk, which text
may still follow).

Invariant every dialect keeps: nothing the client receives contains text the rules have not
seen. Strings outside channels go to the engine as ``others`` (checked whole), and anything
derived from a channel's text (logprobs, ``*.done`` events, final objects) is written from what
the client received (:class:`Ledger`), never from the original.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol


class Framing(enum.Enum):
    """How a body is cut into frames."""

    SSE = "sse"  # server-sent events (text/event-stream)
    NDJSON = "ndjson"  # one JSON value per line (application/x-ndjson)
    JSON = "json"  # one whole JSON body (a "stream": false answer)
    TEXT = "text"  # a plain text body, streamed as it comes


class Kind(enum.Enum):
    """What a channel carries: the answer, the model's reasoning, or a tool call."""

    ANSWER = "answer"
    REASONING = "reasoning"
    TOOL = "tool"


class Piece(NamedTuple):
    """One channel's text in one event, and where it sits there (``path``, the dialect's business).

    ``json_text``: the channel's text is JSON (tool-call arguments); rules read its strings
    unescaped, as the client will once it parses them.
    """

    channel: str
    text: str
    path: tuple[Any, ...] = ()
    kind: Kind = Kind.ANSWER
    json_text: bool = False


class EventKind(enum.Enum):
    TEXT = "text"  # carries pieces of text, ends or waits for channels
    PASS = "pass"  # carries no channel text: forwarded as is (its ``others`` still checked)
    END = "end"  # the stream's own end ([DONE], message_stop, done: true...)
    ERROR = "error"  # an error the app or upstream sent in the stream
    UNKNOWN = "unknown"  # readable, but not an event of this dialect: forwarded if its strings are clean
    MALFORMED = "malformed"  # unreadable: ends the stream with an error


class Parsed(NamedTuple):
    """One frame as the dialect read it.

    Attributes:
        kind: what the frame is.
        raw: its bytes as received (what goes out when nothing in it changes).
        pieces: the channel text it carries, in order.
        others: every other string the client receives from it (JSON strings and keys outside
            channels, SSE ``id``/``event`` values, comments): checked whole, not released piecewise.
        ends: channels it ends for good, after its pieces.
        waits: channel-name prefixes whose held text must go out before this frame.
        data: the dialect's own reading of the frame (the JSON object), for ``rewrite``.
        detail: for MALFORMED and UNKNOWN frames, what was wrong.
        derived: the frame repeats channel text (a ``*.done`` event, a snapshot): it is always
            re-rendered, from what the client received.
    """

    kind: EventKind
    raw: bytes
    pieces: tuple[Piece, ...] = ()
    others: tuple[str, ...] = ()
    ends: tuple[str, ...] = ()
    waits: tuple[str, ...] = ()
    data: Any = None
    detail: str = ""
    derived: bool = False


class StopReason(enum.Enum):
    """Why the guard stops a stream early; each dialect spells it its own way."""

    POLICY = "policy"  # a rule objected to the text (content_filter, refusal, SAFETY...)
    LENGTH = "length"  # a budget ran out (length, max_tokens, MAX_TOKENS...)


@dataclass(frozen=True, slots=True)
class Stop:
    """End the stream now, with ``reason``."""

    reason: StopReason


@dataclass(frozen=True, slots=True)
class FallbackText:
    """End the stream with ``text`` appended to the answer, as a normal completion."""

    text: str


@dataclass(frozen=True, slots=True)
class Fail:
    """End the stream with an error the client's SDK raises."""

    code: str
    message: str
    error_type: str = "guardrail_error"

    @property
    def coded_message(self) -> str:
        """The message with the code in it, for envelopes without a code field and clients that
        keep only the message."""
        return f"{self.message} (code: {self.code})"


Ending = Stop | FallbackText | Fail


class Ledger(Protocol):
    """What the client has received so far, for endings and final objects."""

    @property
    def prompt_tokens(self) -> int | None: ...

    def completion_tokens(self) -> int | None:
        """Tokens of the text the client received (None: not counted)."""
        ...

    def sent(self, channel: str) -> str:
        """The text of ``channel`` the client received, replacements included."""
        ...

    def add(self, channel: str, text: str) -> None:
        """Record ``text`` as received on ``channel`` (fallback text written by the dialect)."""
        ...


class DialectStream(Protocol):
    """One response in one dialect: reads its frames, writes what the guard adds or changes.

    A stream may also define ``outgoing(data: bytes) -> bytes``: the engine then passes every
    byte for the client through it (the Responses dialect renumbers its events there); and
    ``complete``, False until the stream has said it is over (a finish, an end event): a body
    that ends while it is False was cut short, and the guard ends it with an error; and
    ``hidden``, the kinds of channel the engine withholds (final answer only), which it sets so
    that the dialect can leave out the events that only frame withheld text.
    """

    framing: Framing
    dialect_name: str

    def parse(self, frame: bytes, fields: Any = None) -> Parsed:
        """Read one frame (``fields``: what the framing decoded of it, such as an SSE event)."""
        ...

    def rewrite(self, parsed: Parsed, texts: Mapping[int, str], ledger: Ledger, *, closing: bool = True) -> bytes:
        """``parsed`` with piece ``i``'s text replaced by ``texts.get(i, "")``; b"" if nothing is left.

        ``closing=False``: without what closes channels (its finish marks), which the engine
        then sends later with :meth:`closing`.
        """
        ...

    def closing(self, parsed: Parsed, ledger: Ledger) -> bytes:
        """The part of ``parsed`` that closes channels, alone (see ``waits``)."""
        ...

    def text(self, channel: str, text: str) -> bytes:
        """A frame carrying ``text`` on ``channel``: text released after its own frame went out."""
        ...

    def end(self, ending: Ending | None, ledger: Ledger, parsed: Parsed | None = None) -> bytes:
        """The frames that end the stream.

        ``ending`` None: the stream ended on its own, with ``parsed`` (its END frame), or at
        the end of the body if ``parsed`` is None too; the dialect adds what the client is owed
        (a usage chunk asked for, a final object).
        """
        ...


class RequestInfo(NamedTuple):
    """What a dialect needs of the request to answer in kind."""

    path: str = ""
    payload: Mapping[str, Any] | None = None
    created: int = 0  # when the answer started, in Unix seconds (the shell reads the clock)


class Dialect(Protocol):
    """A provider's wire format: stateless, shared by every stream."""

    name: str

    def start(self, framing: Framing, request: RequestInfo | None = None, **options: Any) -> DialectStream:
        """A stream object for one response in ``framing``."""
        ...

    def error_body(self, status: int, code: str, message: str, param: str | None = None) -> bytes:
        """A whole error response body in this dialect's envelope."""
        ...

    def prompt_tokens(self, payload: Mapping[str, Any], count: Any) -> int:
        """The request's prompt tokens, ``count(text)`` counting one text."""
        ...
