"""Reading what an app or upstream answers: content encodings decoded, content types sorted out.

On a guarded path the guard must read every answer that could carry model text. A body in
``gzip``, ``deflate`` or ``br`` (with the ``brotli`` package) is decoded and sent on as
identity; an encoding it cannot decode is refused rather than passed. :func:`read_content_type`
says what a 2xx answer is: an event stream, a JSON body, NDJSON or plain text (each guarded),
media that cannot carry text (passed), or something the guard cannot read (refused unless the
rule file passes it on purpose). Bodies labelled JSON, NDJSON or plain text are sniffed: SSE
under another label is still read as SSE.
"""

from __future__ import annotations

import enum
import zlib
from typing import Any, Protocol

from guardrail.core.dialect import Framing

try:  # optional: pip install 'guardrail-stream[brotli]'
    import brotli as _brotli
except ImportError:  # pragma: no cover - depends on the environment
    _brotli = None

# A decoded body may be at most this many times its encoded size plus a MiB: a compression bomb
# is refused instead of filling memory.
MAX_EXPANSION = 1000


class DecodeError(ValueError):
    """A body that does not decode as its ``content-encoding`` says."""


class _Decompressor(Protocol):
    def decompress(self, data: bytes) -> bytes: ...


class ContentDecoder:
    """Decodes one ``content-encoding`` (gzip, deflate, br) incrementally."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._in = 0
        self._out = 0
        self._decoder: Any
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = None  # zlib-wrapped or raw: decided by the first bytes
        elif encoding == "br" and _brotli is not None:
            self._decoder = _brotli.Decompressor()
        else:
            raise DecodeError(f"content-encoding {encoding!r} cannot be decoded here")

    @staticmethod
    def supports(encoding: str) -> bool:
        return encoding in ("gzip", "x-gzip", "deflate") or (encoding == "br" and _brotli is not None)

    def decode(self, data: bytes) -> bytes:
        if self._decoder is None:
            # RFC 9110 deflate is zlib-wrapped; some servers send raw deflate.
            wrapped = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        try:
            decompress = getattr(self._decoder, "decompress", None) or self._decoder.process  # brotli's is process()
            out: bytes = decompress(data) if data else b""
        except (zlib.error, Exception) as exc:
            raise DecodeError(f"a {self.encoding} body that does not decode: {exc}") from None
        self._in += len(data)
        self._out += len(out)
        if self._out > MAX_EXPANSION * self._in + (1 << 20):
            raise DecodeError(f"a {self.encoding} body expanding more than {MAX_EXPANSION}x")
        return out

    def flush(self) -> bytes:
        flush = getattr(self._decoder, "flush", None)
        try:
            return flush() if flush is not None else b""
        except zlib.error as exc:
            raise DecodeError(f"a {self.encoding} body cut short: {exc}") from None


class Reading(enum.Enum):
    """What to do with an answer on a guarded path."""

    GUARD = "guard"  # read it with a dialect (the framing may still need a sniff)
    PASS = "pass"  # it cannot carry text (images, audio, video), or it is not a success
    REFUSE = "refuse"  # it could carry text the guard cannot read


# Content types whose bodies hold no text a client reads as the model's answer.
_MEDIA = (b"image/", b"audio/", b"video/", b"font/")
_SNIFFED = (b"application/json", b"text/plain", b"application/x-ndjson", b"application/jsonl", b"")


def read_content_type(content_type: bytes) -> tuple[Reading, Framing | None]:
    """How to read a 2xx answer of ``content_type`` (lowercased, without parameters).

    Returns:
        What to do, and the framing when the type says it (None: sniff the first bytes).
    """
    if content_type == b"text/event-stream":
        return Reading.GUARD, Framing.SSE
    if content_type in _SNIFFED or content_type.endswith(b"+json") or content_type.startswith(b"text/"):
        return Reading.GUARD, None
    if content_type.startswith(_MEDIA):
        return Reading.PASS, None
    return Reading.REFUSE, None


SNIFF_BYTES = 64


def sniff_framing(head: bytes, content_type: bytes, *, complete: bool) -> Framing | None:
    """The framing of a body that starts with ``head``; None while more bytes are needed to tell.

    An event stream is recognised by its first field whatever the label; otherwise the label
    decides: NDJSON for ``application/x-ndjson``, one JSON body for JSON types, plain text else.
    """
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if not text and not complete:
        return None
    for field in (b"data:", b"event:", b"id:", b"retry:", b":"):
        if text.startswith(field):
            return Framing.SSE
        if field.startswith(text) and not complete:
            return None  # too short to tell yet
    if content_type in (b"application/x-ndjson", b"application/jsonl"):
        return Framing.NDJSON
    if content_type == b"application/json" or content_type.endswith(b"+json"):
        return Framing.JSON
    return Framing.TEXT
