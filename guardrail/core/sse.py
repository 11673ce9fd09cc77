"""Server-sent events: a sans-IO decoder and the encoder every synthesised byte goes through.

The decoder follows the WHATWG event-stream rules (HTML §9.2.5-9.2.6) but, unlike a browser,
returns *every* block it reads, including blocks that dispatch nothing (keep-alive comments,
stray blank lines), each with the exact bytes it was made of. That lets the middleware pass the
stream through byte for byte and in order, and decide itself what counts as an event
(``data is not None``).

It works on bytes: line ends (CR, LF, CRLF) are ASCII and never occur inside a UTF-8 multi-byte
sequence, so only complete lines are decoded, and a character split across chunks needs no
special care.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from mypy_extensions import mypyc_attr

from guardrail.exceptions import SSEError

__all__ = ["MAX_EVENT_BYTES", "SSEDecoder", "SSEEvent", "encode_comment", "encode_event"]

# The cap on one block (its lines and the blank line that ends it), held in memory until it ends.
# A typical OpenAI chunk is under 1 KiB; chunks with logprobs, tool-call arguments or audio reach
# tens of KiB. 1 MiB leaves ample room for those while bounding what a hostile or broken stream can
# make us hold per stream.
MAX_EVENT_BYTES: int = 1 << 20

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_CR = 0x0D
_SPACE = 0x20
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class SSEEvent(NamedTuple):
    """One block of an event stream: its lines up to and including the blank line that ends it.

    A named tuple rather than a frozen dataclass: one is built per delta, at a third of the cost.

    Attributes:
        raw: the block's bytes as they should be forwarded. They are the bytes received, except
            that invalid UTF-8 is replaced by U+FFFD (so the client sees the text that was checked).
            When the previous block ended with a CR, an LF that followed it starts this block.
        data: the ``data`` field values joined with ``"\\n"``; None if the block had no ``data``
            field, which means it dispatches nothing.
        event: the last ``event`` field value, or None.
        id: the last ``id`` field value without U+0000, or None.
        retry: the last ``retry`` field value made only of ASCII digits, or None.
        comments: the block's comment lines without their leading ``":"``.
    """

    raw: bytes
    data: str | None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comments: tuple[str, ...] = ()


@mypyc_attr(allow_interpreted_subclasses=True)
class SSEDecoder:
    """Turns the bytes of an event stream into :class:`SSEEvent` blocks, whatever the chunking.

    Feed it chunks as they arrive, then call :meth:`close` at the end of the stream. The same
    bytes give the same events however they are split. Time and memory are linear in the bytes
    fed; at most one block (``max_event_bytes``) is buffered.
    """

    __slots__ = (
        "_bom_prefix",
        "_closed",
        "_comments",
        "_data_lines",
        "_discarded",
        "_event",
        "_failure",
        "_id",
        "_line_start",
        "_max_event_bytes",
        "_pending",
        "_repaired",
        "_retry",
        "_swallow_lf",
    )

    def __init__(self, *, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        """Create a decoder for one stream.

        Args:
            max_event_bytes: the largest block accepted, in bytes, blank line included.

        Raises:
            ValueError: if ``max_event_bytes`` is less than 1.
        """
        if max_event_bytes < 1:
            raise ValueError(f"max_event_bytes must be at least 1, got {max_event_bytes}")
        self._max_event_bytes = max_event_bytes
        # Bytes that may be the start of a BOM; None once the start of the stream is settled.
        self._bom_prefix: bytes | None = b""
        # Bytes of the current block received by earlier feeds, incomplete line included.
        self._pending = bytearray()
        self._line_start = 0  # where the incomplete line starts in _pending
        # The last line ended with CR: an LF arriving next completes that line end.
        self._swallow_lf = False
        self._failure: SSEError | None = None
        self._closed = False
        self._discarded = 0
        self._data_lines: list[str] | None = None
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._comments: list[str] | None = None
        self._repaired = False

    @property
    def discarded(self) -> int:
        """Bytes of an unterminated final block that :meth:`close` threw away (0 until then)."""
        return self._discarded

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Read the next chunk of the stream.

        Args:
            chunk: the next bytes, of any length (empty is fine).

        Returns:
            The blocks completed by this chunk, in order.

        Raises:
            SSEError: if a block grows past ``max_event_bytes``, or if the decoder already failed.
            RuntimeError: if called after :meth:`close`.
        """
        if self._failure is not None or self._closed:
            self._raise_if_unusable()
        if self._bom_prefix is not None:
            chunk = self._strip_bom(chunk)
        if not chunk:
            return []
        if not self._pending and not self._swallow_lf:
            event = self._read_data_event(chunk)
            if event is not None:
                return [event]
        try:
            return self._read(chunk)
        except SSEError as error:
            self._failure = error
            raise

    def close(self) -> list[SSEEvent]:
        """End the stream.

        An unterminated final block is discarded, as the spec requires (its size is kept in
        :attr:`discarded`). A lone LF completing the CRLF that ended the last block is returned
        as a block of its own, so that no byte of a well-formed stream is lost.

        Returns:
            The blocks the end of the stream completes: usually none.

        Raises:
            SSEError: if the decoder already failed.
        """
        if self._failure is not None:
            self._raise_if_unusable()
        if self._closed:
            return []
        self._closed = True
        if self._bom_prefix:
            self._discarded = len(self._bom_prefix)
            return []
        if self._pending == b"\n":
            return [SSEEvent(b"\n", None)]
        self._discarded = len(self._pending)
        self._pending.clear()
        return []

    def _raise_if_unusable(self) -> None:
        if self._failure is not None:
            raise SSEError(f"the event stream already failed: {self._failure}")
        if self._closed:
            raise RuntimeError("SSEDecoder.feed() called after close()")

    def _strip_bom(self, chunk: bytes) -> bytes:
        assert self._bom_prefix is not None
        start = self._bom_prefix + chunk
        if len(start) < len(_BOM) and _BOM.startswith(start):
            self._bom_prefix = start
            return b""
        self._bom_prefix = None
        return start[len(_BOM) :] if start.startswith(_BOM) else start

    def _read_data_event(self, chunk: bytes) -> SSEEvent | None:
        """Read a chunk that is exactly one block of one ``data:`` line ended by LF LF, or return None.

        That is how an OpenAI stream arrives, one delta per chunk, so :meth:`feed` is called this
        way thousands of times per answer, and :meth:`_read` costs several times the event itself.
        Called only between blocks (nothing pending, no CR waiting for its LF), where :meth:`_read`
        would return the same event and leave the decoder as it found it. Anything else (other
        fields, comments, CR, a second line or block, a block cut short, invalid UTF-8, a block over
        ``max_event_bytes``) returns None before any change, and goes to :meth:`_read`.
        """
        if not chunk.startswith(b"data:") or not chunk.endswith(b"\n\n") or len(chunk) > self._max_event_bytes:
            return None
        value = chunk[6 if chunk[5] == _SPACE else 5 : -2]
        if _LF in value or _CR in value:
            return None
        try:
            data = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return SSEEvent(chunk, data, None, None, None, ())

    def _read(self, chunk: bytes) -> list[SSEEvent]:
        pieces = chunk.splitlines(True)
        tail = pieces[-1]
        if tail[-1] == _LF or tail[-1] == _CR:
            tail = b""
        else:
            pieces.pop()
        events: list[SSEEvent] = []
        pending = self._pending
        carries_line = self._line_start < len(pending)
        block_start = position = 0
        if self._swallow_lf:
            self._swallow_lf = False
            if chunk[0] == _LF:
                # This LF completes the CRLF whose CR ended the last chunk: part of a line end, not a line.
                del pieces[0]
                position = 1
        # A block only grows, so checking its size when it ends or when the chunk ends gives the
        # same verdict however the stream is chunked.
        for piece in pieces:
            end = position + len(piece)
            line = piece.rstrip(b"\r\n")
            if carries_line:
                line = bytes(pending[self._line_start :]) + line
                carries_line = False
            if line:
                self._read_line(line)
                position = end
                continue
            # A blank line ends the block. After a CR the block is returned at once, without waiting
            # for the next byte, so the LF of that CRLF goes to the next block.
            block_end = end - 1 if piece == b"\r\n" else end
            if len(pending) + block_end - block_start > self._max_event_bytes:
                raise self._too_big()
            events.append(self._take_event(chunk, block_start, block_end))
            block_start, position = block_end, end
        if carries_line:  # the chunk only extends the incomplete line
            pending += chunk
        else:
            pending += chunk[block_start:]
            self._line_start = len(pending) - len(tail)
        if len(pending) > self._max_event_bytes:
            raise self._too_big()
        if not tail:
            self._swallow_lf = chunk[-1] == _CR
        return events

    def _too_big(self) -> SSEError:
        return SSEError(f"event exceeds {self._max_event_bytes} bytes without ending")

    def _read_line(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", "replace")
            self._repaired = True
        if text[0] == ":":
            if self._comments is None:
                self._comments = [text[1:]]
            else:
                self._comments.append(text[1:])
            return
        name, _, value = text.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            if self._data_lines is None:
                self._data_lines = [value]
            else:
                self._data_lines.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)

    def _take_event(self, chunk: bytes, start: int, end: int) -> SSEEvent:
        raw = chunk[start:end]
        if self._pending:
            raw = bytes(self._pending) + raw
            self._pending.clear()
        if self._repaired:
            raw = raw.decode("utf-8", "replace").encode("utf-8")
            self._repaired = False
        data = None if self._data_lines is None else "\n".join(self._data_lines)
        comments = () if self._comments is None else tuple(self._comments)
        event = SSEEvent(raw, data, self._event, self._id, self._retry, comments)
        self._data_lines = self._event = self._id = self._retry = self._comments = None
        return event


def encode_event(data: str, *, event: str | None = None, id: str | None = None) -> bytes:
    """Serialise one event so that no value can break out of its field.

    Args:
        data: the payload; each of its lines (split on CRLF, CR or LF) becomes a ``data:`` line.
        event: the event type, or None for none. CR and LF are removed.
        id: the event id, or None for none. CR and LF are removed.

    Returns:
        The event as UTF-8 bytes: ``event:``, ``id:``, then ``data:`` lines, then a blank line.

    Raises:
        UnicodeEncodeError: if a value contains a lone surrogate.
    """
    if event is None and id is None and "\n" not in data and "\r" not in data:
        return b"data: " + data.encode("utf-8") + b"\n\n"  # one line: what nearly every event is
    lines = []
    if event is not None:
        lines.append(f"event: {_without_line_breaks(event)}\n")
    if id is not None:
        lines.append(f"id: {_without_line_breaks(id)}\n")
    lines.extend(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    lines.append("\n")
    return "".join(lines).encode("utf-8")


def encode_comment(text: str) -> bytes:
    """Serialise a comment block, such as a keep-alive, which clients ignore.

    Args:
        text: the comment; each of its lines becomes a ``: `` line (``:`` alone when empty).

    Returns:
        The comment block as UTF-8 bytes, ended by a blank line.

    Raises:
        UnicodeEncodeError: if ``text`` contains a lone surrogate.
    """
    lines = [f": {line}\n" if line else ":\n" for line in _LINE_BREAK.split(text)]
    lines.append("\n")
    return "".join(lines).encode("utf-8")


def _without_line_breaks(value: str) -> str:
    return value.replace("\r", "").replace("\n", "")
