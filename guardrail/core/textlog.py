"""A growing text kept as a few strings, not one per delta.

A channel's released text is needed whole only at the end (its token count, a dialect's
closing events), but it arrives a few characters at a time. A list of the deltas costs a
string object per delta (about 50 bytes each beside the text); joining on every append costs
a copy of everything so far. :class:`TextLog` keeps each part at least twice as long as the
next newer one, merging the last two while the older is shorter than that: n characters make
at most log2(n + 1) parts, and each character is copied O(log n) times over the stream.
"""

from __future__ import annotations


class TextLog:
    """Append-only text; :meth:`text` joins it."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[str] = []

    def append(self, text: str) -> None:
        if not text:
            return
        parts = self._parts
        parts.append(text)
        while len(parts) > 1 and len(parts[-2]) < 2 * len(parts[-1]):
            last = parts.pop()
            parts[-1] += last

    def text(self) -> str:
        parts = self._parts
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    def take(self) -> str:
        """The text so far, leaving the log empty."""
        text = self.text()
        self._parts.clear()
        return text

    def __bool__(self) -> bool:
        return bool(self._parts)
