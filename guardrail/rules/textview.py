"""Matching through Unicode tricks: a folded view of a channel's text, with offsets mapped back.

With ``normalize: true`` a ``banned_patterns`` rule checks a view of the text in which each
character is folded on its own:

- *default-ignorable* characters are dropped: zero-width space, joiners and non-joiners, soft
  hyphen, word joiner, byte order mark, variation selectors, Hangul fillers, tag characters;
- each remaining character is decomposed for compatibility (NFKD: fullwidth and other width
  forms, ligatures, circled and mathematical letters, superscripts become their plain letters),
  its combining marks are dropped (``é`` reads as ``e``, a combining mark placed inside a word
  disappears), and what is left is composed again (NFC, so Hangul syllables stay syllables).

Case is left to the rule (phrases are case-insensitive). Not normalised: confusable letters of
other scripts (Cyrillic ``а`` for Latin ``a``), spaces inside words, leetspeak, or text split
between channels. Hits and the safe offset are mapped back to the original text, so a
redaction cuts exactly the original characters of the match and keeps every other byte.
"""

from __future__ import annotations

import functools
import unicodedata

import regex

from guardrail.core.rule import Checker, Hit, Verdict

_IGNORABLE = regex.compile(r"\p{Default_Ignorable_Code_Point}")
_MARK = regex.compile(r"[\p{Mn}\p{Me}]")


@functools.lru_cache(maxsize=8192)
def fold(char: str) -> str:
    """The view of one character (see the module docstring)."""
    if _IGNORABLE.match(char):
        return ""
    decomposed = unicodedata.normalize("NFKD", char)
    if decomposed == char and not _MARK.match(char):
        return char
    return unicodedata.normalize("NFC", _MARK.sub("", decomposed))


def fold_text(text: str) -> str:
    """``text`` folded character by character (what a phrase is compared with)."""
    return text if text.isascii() else "".join(fold(char) for char in text)


class _ViewChecker:
    """Runs ``inner`` on a view of the text (built by :meth:`_view`) and maps its verdicts back."""

    __slots__ = ("_ends", "_inner", "_received", "_starts", "_view_base")

    def __init__(self, inner: Checker) -> None:
        self._inner = inner
        self._starts: list[int] = []  # original offset of each view character from _view_base on
        self._ends: list[int] = []  # original offset just after it
        self._view_base = 0
        self._received = 0

    def _view(self, text: str, start: int) -> str:
        """The view of ``text`` (which starts at original offset ``start``); appends to the offset maps."""
        raise NotImplementedError

    def feed(self, text: str) -> Verdict:
        start = self._received
        self._received += len(text)
        return self._map(self._inner.feed(self._view(text, start)))

    def finish(self) -> Verdict:
        return self._map(self._inner.finish())

    def _map(self, verdict: Verdict) -> Verdict:
        base = self._view_base
        starts, ends = self._starts, self._ends
        hits = []
        for hit in verdict.hits:
            first = starts[hit.start - base] if hit.start - base < len(starts) else self._received
            last = ends[hit.end - 1 - base] if 0 <= hit.end - 1 - base < len(ends) else self._received
            hits.append(Hit(first, max(first, last), hit.detail))
        held = verdict.safe - base
        safe = starts[held] if held < len(starts) else self._received
        if held > 4096:  # the view before the safe offset is never asked about again
            del starts[:held], ends[:held]
            self._view_base += held
        return Verdict(safe, tuple(hits))


class FoldedChecker(_ViewChecker):
    """Runs ``inner`` on the folded view of the text (see the module docstring)."""

    __slots__ = ()

    def _view(self, text: str, start: int) -> str:
        if text.isascii():
            self._starts.extend(range(start, start + len(text)))
            self._ends.extend(range(start + 1, start + len(text) + 1))
            return text
        parts = []
        for offset, char in enumerate(text, start):
            folded = fold(char)
            if folded:
                parts.append(folded)
                self._starts.extend([offset] * len(folded))
                self._ends.extend([offset + 1] * len(folded))
        return "".join(parts)


_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class JsonTextChecker(_ViewChecker):
    """Runs ``inner`` on JSON text (tool-call arguments) as a client reads it: its strings unescaped.

    A key written ``"sk-\\u0041..."`` in a tool call's arguments is ``sk-A...`` once the client
    parses them; this view decodes escapes inside strings as the text streams, so rules see
    that. A hit maps back to whole escape sequences.
    """

    __slots__ = ("_escape", "_escape_start", "_in_string")

    def __init__(self, inner: Checker) -> None:
        super().__init__(inner)
        self._in_string = False
        self._escape: str | None = None  # after a backslash: what of the escape has come so far
        self._escape_start = 0

    def _view(self, text: str, start: int) -> str:
        if "\\" not in text and self._escape is None:
            self._in_string ^= text.count('"') % 2 == 1
            self._starts.extend(range(start, start + len(text)))
            self._ends.extend(range(start + 1, start + len(text) + 1))
            return text
        out = []
        for offset, char in enumerate(text, start):
            if self._escape is not None:
                self._escape += char
                escape = self._escape
                if escape[0] == "u" and len(escape) < 5:
                    continue
                self._escape = None
                if escape[0] == "u":
                    try:
                        decoded = chr(int(escape[1:], 16))
                    except ValueError:
                        decoded = "\\" + escape
                else:
                    decoded = _ESCAPES.get(escape, "\\" + escape)
                out.append(decoded)
                self._starts.extend([self._escape_start] * len(decoded))
                self._ends.extend([offset + 1] * len(decoded))
                continue
            if char == "\\" and self._in_string:
                self._escape = ""
                self._escape_start = offset
                continue
            if char == '"':
                self._in_string = not self._in_string
            out.append(char)
            self._starts.append(offset)
            self._ends.append(offset + 1)
        return "".join(out)
