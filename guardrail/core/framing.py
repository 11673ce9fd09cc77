"""Framings: how a body's bytes are cut into the frames a dialect reads.

Each decoder takes chunks as they arrive and returns complete frames as ``(raw, fields)``
pairs: ``raw`` is the frame's bytes as they go out when nothing in it changes, ``fields`` what
the framing decoded of it (an :class:`~guardrail.core.sse.SSEEvent` for SSE, else None). The
same bytes give the same frames however they are split; memory is bounded per framing.
"""

from __future__ import annotations

import codecs
from typing import Any

from guardrail.core.dialect import Framing
from guardrail.core.sse import MAX_EVENT_BYTES, SSEDecoder
from guardrail.exceptions import SSEError

Frame = tuple[bytes, Any]

# A whole (non-streamed) JSON body is held until it is complete: 16 MiB bounds what one
# response can make the guard hold; a larger body is refused with an error.
MAX_BODY_BYTES = 16 << 20


class FramingError(SSEError):
    """A frame or body over its size bound."""


class SSEFrames:
    """SSE blocks (see :class:`~guardrail.core.sse.SSEDecoder`)."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = SSEDecoder()

    @property
    def discarded(self) -> int:
        return self._decoder.discarded

    def feed(self, data: bytes) -> list[Frame]:
        return [(event.raw, event) for event in self._decoder.feed(data)]

    def close(self) -> list[Frame]:
        return [(event.raw, event) for event in self._decoder.close()]


class NDJSONFrames:
    """One JSON value per line; a last line without its newline still counts at the end."""

    discarded = 0

    def __init__(self, max_line_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_line_bytes

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) != -1:
            frames.append((bytes(self._buffer[start : end + 1]), None))
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > self._max:
            raise FramingError(f"a line of over {self._max} bytes")
        return frames

    def close(self) -> list[Frame]:
        rest, self._buffer = bytes(self._buffer), bytearray()
        return [(rest, None)] if rest.strip() else []


class WholeBody:
    """The whole body as one frame, at the end."""

    discarded = 0

    def __init__(self, max_bytes: int = MAX_BODY_BYTES) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._max = max_bytes

    def feed(self, data: bytes) -> list[Frame]:
        self._size += len(data)
        if self._size > self._max:
            raise FramingError(f"a body of over {self._max} bytes")
        self._parts.append(data)
        return []

    def close(self) -> list[Frame]:
        body, self._parts = b"".join(self._parts), []
        return [(body, None)] if body.strip() else []  # an empty body (HEAD, 204) has nothing to read


class TextFrames:
    """Plain text: every chunk is a frame, cut only between UTF-8 characters."""

    discarded = 0

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes) -> list[Frame]:
        text = self._decoder.decode(data)
        return [(text.encode(), text)] if text else []

    def close(self) -> list[Frame]:
        text = self._decoder.decode(b"", final=True)
        return [(text.encode(), text)] if text else []


Frames = SSEFrames | NDJSONFrames | WholeBody | TextFrames


def frames_for(framing: Framing) -> Frames:
    if framing is Framing.SSE:
        return SSEFrames()
    if framing is Framing.NDJSON:
        return NDJSONFrames()
    if framing is Framing.JSON:
        return WholeBody()
    return TextFrames()
