"""A growing text kept as a few strings, not one per delta.

A channel's released text is needed whole only at the end (its token count, a dialect's
closing events), but it arrives a few characters at a time. A list of the deltas costs a
string object per delta (about 50 bytes each beside the text); joining on every append costs
a copy of everything so far. :class:`TextLog` grows its newest part by concatenation while it
is short (a copy of at most :data:`SMALL` characters per append), then keeps each older part at
least twice as long as the next newer one, merging the last two while the older is shorter than
that: n characters make at most log2(n / SMALL) + 2 parts, and each character is copied
O(log n) times over the stream. A short answer is one string.
"""

from __future__ import annotations

# The newest part grows by concatenation below this many characters.
SMALL = 256


class TextLog:
    """Append-only text; :meth:`text` joins it."""

    __slots__ = ("_last", "_parts")

    def __init__(self) -> None:
        self._last = ""  # the newest part
        self._parts: list[str] | None = None  # the older ones, oldest first, once there are any

    def append(self, text: str) -> None:
        if len(self._last) < SMALL:
            self._last += text
            return
        if not text:
            return
        parts = self._parts
        if parts is None:
            parts = self._parts = []
        parts.append(self._last)
        self._last = text
        while len(parts) > 1 and len(parts[-2]) < 2 * len(parts[-1]):
            last = parts.pop()
            parts[-1] += last

    def text(self) -> str:
        parts = self._parts
        if parts:
            parts.append(self._last)
            self._last = "".join(parts)
            self._parts = None
        return self._last

    def take(self) -> str:
        """The text so far, leaving the log empty."""
        text = self.text()
        self._last = ""
        return text

    def __bool__(self) -> bool:
        return bool(self._last)  # (older parts are kept only behind a newer, non-empty one)
