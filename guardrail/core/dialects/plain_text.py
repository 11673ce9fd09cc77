"""Plain text answers (``text/plain``, or any text that is neither an event stream nor JSON).

The whole body is one channel, ``text``, streamed as it comes (split only between UTF-8
characters). A policy or length stop simply ends the body after the safe prefix; fallback text
is appended (after the fallback's separator, a blank line by default); an error ends the body
with a bracketed note, the only way plain text has to say so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mypy_extensions import mypyc_attr

from guardrail.core.dialect import Ending, EventKind, Fail, FallbackText, Framing, Ledger, Parsed, Piece, RequestInfo

NAME = "text"
CHANNEL = "text"


@mypyc_attr(allow_interpreted_subclasses=True)
class PlainText:
    """The plain text dialect."""

    name = NAME

    def start(self, framing: Framing, request: RequestInfo | None = None, **options: Any) -> TextStream:
        return TextStream()

    def error_body(self, status: int, code: str, message: str, param: str | None = None) -> bytes:
        return f"[{code}] {message}\n".encode()

    def prompt_tokens(self, payload: Mapping[str, Any], count: Callable[[str], int]) -> int:
        return sum(count(value) for value in payload.values() if isinstance(value, str))


DIALECT = PlainText()


@mypyc_attr(allow_interpreted_subclasses=True)
class TextStream:
    """One plain text answer."""

    dialect_name = NAME
    framing = Framing.TEXT

    def parse(self, frame: bytes, fields: Any = None) -> Parsed:
        text = fields if isinstance(fields, str) else frame.decode("utf-8", "replace")
        return Parsed(EventKind.TEXT, frame, (Piece(CHANNEL, text),) if text else ())

    def rewrite(self, parsed: Parsed, texts: Mapping[int, str], ledger: Ledger, *, closing: bool = True) -> bytes:
        return texts.get(0, "").encode()

    def closing(self, parsed: Parsed, ledger: Ledger) -> bytes:
        return b""

    def text(self, channel: str, text: str) -> bytes:
        return text.encode()

    def end(self, ending: Ending | None, ledger: Ledger, parsed: Parsed | None = None) -> bytes:
        if isinstance(ending, FallbackText):
            ledger.add(CHANNEL, ending.text)
            return ending.text.encode()
        if isinstance(ending, Fail):
            return f"\n\n[{ending.code}] {ending.message}\n".encode()
        return b""
