"""Literal phrases at scale: a word index instead of one regex alternative per phrase.

A phrase made of word characters (``project starlight``) matches the same text as the regex
``(?<!\\w)(?i:project\\s+starlight)(?!\\w)``: the same words, case-insensitively (by case
folding), any run of whitespace between them, word-bounded. Instead of trying every phrase at
every position, the checker walks the text word by word and looks each word up in an index of
first words, so 10,000 phrases cost about what one does. Phrases with other characters, or
written in scripts without spaces between words, stay with the regex (see ``phrase_pattern``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

import regex

from guardrail.core.rule import Hit, Verdict

_WORD = regex.compile(r"\w+")
_NEXT_WORD = regex.compile(r"\s+(\w+)")
# The same in ASCII text, which nearly all text is: what \w and \s match there, spelled out for
# the re module, which finds it in about two thirds of the time.
_ASCII_WORD = re.compile(r"[0-9A-Za-z_]+")
_ASCII_NEXT_WORD = re.compile(r"[ \t\n\x0b\x0c\r]+([0-9A-Za-z_]+)")
_SIMPLE = regex.compile(r"\w+(?:\s+\w+)*")
# Scripts written without spaces between words: a phrase there has no word boundary at that edge.
# (The kana block also holds marks of the Common script, such as the prolonged sound mark ー.)
UNSPACED = regex.compile(
    r"[\p{Han}\p{Hangul}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\p{Tibetan}\u3000-\u30ff\uff66-\uff9f]"
)


def indexable(phrase: str) -> bool:
    """Whether the word index can match ``phrase``: only word characters, and no unspaced script."""
    return _SIMPLE.fullmatch(phrase.strip()) is not None and UNSPACED.search(phrase) is None


class _Candidate(NamedTuple):
    rest: tuple[str, ...]  # the folded words after the first
    label: str


class PhraseIndex:
    """Phrases of word characters, indexed by their first word (case-folded)."""

    def __init__(self, phrases: Iterable[str]) -> None:
        self.first: dict[str, list[_Candidate]] = {}
        self.prefixes: set[str] = set()  # every prefix of every phrase word: what a cut word may become
        for phrase in phrases:
            words = [word.casefold() for word in phrase.split()]
            self.first.setdefault(words[0], []).append(_Candidate(tuple(words[1:]), f"phrase {phrase!r}"))
            for word in words:
                self.prefixes.update(word[:end] for end in range(1, len(word) + 1))
        for candidates in self.first.values():
            candidates.sort(key=lambda candidate: -len(candidate.rest))  # the longest phrase first

    def checker(self) -> PhraseChecker:
        return PhraseChecker(self)


class PhraseChecker:
    """Per-channel state: the text from the first word not yet settled."""

    __slots__ = ("_base", "_index", "_safe", "_tail")

    def __init__(self, index: PhraseIndex) -> None:
        self._index = index
        self._tail = ""  # the text from offset _base on; it starts at a word start or between words
        self._base = 0
        self._safe = 0

    def feed(self, text: str) -> Verdict:
        self._tail += text
        return self._scan(final=False)

    def finish(self) -> Verdict:
        return self._scan(final=True)

    def _scan(self, *, final: bool) -> Verdict:
        tail = self._tail
        end = len(tail)
        hits: list[Hit] | None = None
        resume = end  # where the next scan starts: the last word, if the text may still continue it
        held = end
        first = self._index.first
        is_ascii = tail.isascii()
        for match in (_ASCII_WORD if is_ascii else _WORD).finditer(tail):
            start, stop = match.span()
            word = match.group().casefold()
            if stop == end and not final:
                resume = start
                if word in self._index.prefixes:
                    held = start  # it may grow into a phrase's first word
                break
            candidates = first.get(word)
            if candidates is None:
                continue
            found = self._rest(stop, candidates, final, _ASCII_NEXT_WORD if is_ascii else _NEXT_WORD)
            if found is None:
                continue
            if isinstance(found, int):  # the text may still complete a phrase here
                resume = held = start
                break
            hit_end, label = found
            if hits is None:
                hits = []
            hits.append(Hit(self._base + start, self._base + hit_end, label))
        safe = self._base + held
        if safe < self._safe:
            safe = self._safe
        self._safe = safe
        cut = resume if resume < held else held
        if cut:
            self._tail = tail[cut:]
            self._base += cut
        return Verdict(safe, tuple(hits)) if hits else Verdict(safe)

    def _rest(
        self, pos: int, candidates: list[_Candidate], final: bool, next_word: re.Pattern[str] | regex.Pattern[str]
    ) -> tuple[int, str] | int | None:
        """The end and label of the longest phrase going on at ``pos``; -1 if the text may still make one."""
        tail = self._tail
        end = len(tail)
        pending = False
        words: dict[int, tuple[int, str] | None] = {}  # position: the next word after it (end, folded)
        for candidate in candidates:
            at = pos
            for word in candidate.rest:
                if at not in words:
                    match = next_word.match(tail, at)
                    words[at] = None if match is None else (match.end(), match.group(1).casefold())
                found = words[at]
                if found is None:
                    if not final and (at == end or tail[at:].isspace()):
                        pending = True  # the text stops between the words
                    break
                stop, got = found
                if stop == end and not final:
                    if word.startswith(got):
                        pending = True  # the text stops inside the word
                    break
                if got != word:
                    break
                at = stop
            else:
                return at, candidate.label
        return -1 if pending else None
