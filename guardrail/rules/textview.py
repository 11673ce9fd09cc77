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


class FoldedChecker:
    """Runs ``inner`` on the folded view of the text and maps its verdicts back."""

    __slots__ = ("_ends", "_inner", "_received", "_starts", "_view_base")

    def __init__(self, inner: Checker) -> None:
        self._inner = inner
        self._starts: list[int] = []  # original offset of each view character from _view_base on
        self._ends: list[int] = []  # original offset just after it
        self._view_base = 0
        self._received = 0

    def feed(self, text: str) -> Verdict:
        start = self._received
        self._received += len(text)
        if text.isascii():
            view = text
            self._starts.extend(range(start, start + len(text)))
            self._ends.extend(range(start + 1, start + len(text) + 1))
        else:
            parts = []
            for offset, char in enumerate(text, start):
                folded = fold(char)
                if folded:
                    parts.append(folded)
                    self._starts.extend([offset] * len(folded))
                    self._ends.extend([offset + 1] * len(folded))
            view = "".join(parts)
        return self._map(self._inner.feed(view))

    def finish(self) -> Verdict:
        return self._map(self._inner.finish())

    def _map(self, verdict: Verdict) -> Verdict:
        base = self._view_base
        starts, ends = self._starts, self._ends
        hits = tuple(
            Hit(
                starts[hit.start - base],
                ends[hit.end - 1 - base] if hit.end > hit.start else starts[hit.start - base],
                hit.detail,
            )
            for hit in verdict.hits
        )
        held = verdict.safe - base
        safe = starts[held] if held < len(starts) else self._received
        if held > 4096:  # the view before the safe offset is never asked about again
            del starts[:held], ends[:held]
            self._view_base += held
        return Verdict(safe, hits)
