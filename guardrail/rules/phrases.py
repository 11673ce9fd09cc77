"""Literal phrases at scale: a word index instead of one regex alternative per phrase.

A phrase made of word characters (``project starlight``) matches the same text as the regex
``(?<!\\w)(?i:project\\s+starlight)(?!\\w)``: the same words, case-insensitively (by case
folding), any run of whitespace between them, word-bounded. Instead of trying every phrase at
every position, the checker walks the text word by word and follows each word down a trie of
the phrases' words, so 10,000 phrases cost about what one does. Phrases with other characters, or
written in scripts without spaces between words, stay with the regex (see ``phrase_pattern``).
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterable

import regex

from guardrail.core.rule import Hit, Verdict

# The text as runs of word characters and runs of other characters, alternating.
_TOKENS = regex.compile(r"\w+|\W+")
_SPACES = regex.compile(r"\s+")
# The same in ASCII text, which nearly all text is: what \w and \s match there, spelled out for
# the re module, which finds them in about half the time.
_ASCII_TOKENS = re.compile(r"[0-9A-Za-z_]+|[^0-9A-Za-z_]+")
_ASCII_SPACES = " \t\n\x0b\x0c\r"
_WORD_CHAR = regex.compile(r"\w")
_ASCII_WORD_CHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz")


_SIMPLE = regex.compile(r"\w+(?:\s+\w+)*")
# Scripts written without spaces between words: a phrase there has no word boundary at that edge.
# (The kana block also holds marks of the Common script, such as the prolonged sound mark ー.)
UNSPACED = regex.compile(
    r"[\p{Han}\p{Hangul}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\p{Tibetan}\u3000-\u30ff\uff66-\uff9f]"
)


def indexable(phrase: str) -> bool:
    """Whether the word index can match ``phrase``: only word characters, and no unspaced script."""
    return _SIMPLE.fullmatch(phrase.strip()) is not None and UNSPACED.search(phrase) is None


def _begins_any(words: tuple[str, ...], prefix: str) -> bool:
    """Whether one of ``words`` (sorted) begins with ``prefix``: the least one not below it would."""
    at = bisect_left(words, prefix)
    return at < len(words) and words[at].startswith(prefix)


class _Node:
    """The phrases that go on after some words: a phrase ending here, and the words that may come next."""

    __slots__ = ("label", "next", "sorted")

    def __init__(self) -> None:
        self.label: str | None = None  # the phrase that ends here (as written in the rule), if one does
        self.next: dict[str, _Node] | None = None  # folded next word: what goes on after it (None: nothing)
        self.sorted: tuple[str, ...] = ()  # the next words, sorted: which a word in progress may become


class PhraseIndex:
    """Phrases of word characters, as a trie of their case-folded words."""

    def __init__(self, phrases: Iterable[str]) -> None:
        self.first: dict[str, _Node] = {}
        spelled: dict[str, str] = {}  # one string per word: the index is read after every delta, so smaller is faster
        for phrase in phrases:
            words = [spelled.setdefault(folded, folded) for folded in map(str.casefold, phrase.split())]
            node = self.first.get(words[0])
            if node is None:
                node = self.first[words[0]] = _Node()
            for word in words[1:]:
                if node.next is None:
                    node.next = {}
                child = node.next.get(word)
                if child is None:
                    child = node.next[word] = _Node()
                node = child
            if node.label is None:  # (phrases folding to the same words: the first one names them)
                node.label = phrase
        # The first words, sorted: what a word the text stops in may become, and start a phrase
        # (one already going on there is held from its start; see PhraseChecker._rest).
        self.sorted_first = tuple(sorted(self.first))
        nodes = list(self.first.values())
        while nodes:
            node = nodes.pop()
            if node.next is not None:
                node.sorted = tuple(sorted(node.next))
                nodes.extend(node.next.values())

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

    def finish(self) -> Verdict:
        return self.feed("", final=True)

    def feed(self, text: str, final: bool = False) -> Verdict:
        """Scan the channel's next piece of text (``final``: the channel's text is complete)."""
        self._tail = tail = self._tail + text
        end = len(tail)
        hits: list[Hit] | None = None
        resume = end  # where the next scan starts: the last word, if the text may still continue it
        held = end
        # Nearly all text is ASCII: there \w, \s and case folding are spelled out for the cheaper
        # tools (the re module, str.lower, str.strip), which agree with the general ones there;
        # and lower keeps every length, so the whole text is folded at once.
        ascii_text = tail.isascii()
        tokens: list[str]
        if ascii_text:
            tokens = _ASCII_TOKENS.findall(tail.lower())
            word_first = tail[:1] in _ASCII_WORD_CHARS
        else:
            tokens = _TOKENS.findall(tail)
            word_first = _WORD_CHAR.match(tail) is not None
        count = len(tokens)
        first = self._index.first
        # Words and the runs between them alternate: the first token's kind tells every token's.
        number = start = 0
        if count and not word_first:
            number, start = 1, len(tokens[0])
        while number < count:
            token = tokens[number]
            stop = start + len(token)
            word = token if ascii_text else token.casefold()
            if stop == end and not final:
                resume = start
                if word in first or _begins_any(self._index.sorted_first, word):
                    held = start  # it may grow into a phrase's first word
                break
            node = first.get(word)
            if node is not None:
                found = self._rest(tokens, number, stop, node, final, ascii_text)
                if isinstance(found, int):  # the text may still complete a phrase here
                    resume = held = start
                    break
                if found is not None:
                    hit_end, label = found
                    if hits is None:
                        hits = []
                    hits.append(Hit(self._base + start, self._base + hit_end, f"phrase {label!r}"))
            start = stop + len(tokens[number + 1]) if number + 1 < count else stop
            number += 2
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
        self, tokens: list[str], number: int, at: int, node: _Node, final: bool, ascii_text: bool
    ) -> tuple[int, str] | int | None:
        """The end and label of the longest phrase going on after word ``number`` (ending at ``at``).

        -1 if none has been found and the text may still make one (it stops between words, or
        inside a word that a phrase may go on with).
        """
        longest: tuple[int, str] | None = None if node.label is None else (at, node.label)
        count = len(tokens)
        between = number + 1
        following = node.next
        while following:
            if between >= count:  # the text stops right after the word
                if longest is None and not final:
                    return -1
                break
            gap = tokens[between]
            spaces = not gap.strip(_ASCII_SPACES) if ascii_text else _SPACES.fullmatch(gap) is not None
            if between + 1 >= count or not spaces:  # no word after whitespace only
                if longest is None and not final and between + 1 >= count and gap.isspace():
                    return -1  # the text stops between the words
                break
            token = tokens[between + 1]
            at += len(gap) + len(token)
            got = token if ascii_text else token.casefold()
            if between + 2 >= count and not final:  # the text stops inside the word
                if longest is None and _begins_any(node.sorted, got):
                    return -1
                break
            child = following.get(got)
            if child is None:
                break
            node = child
            between += 2
            if node.label is not None:
                longest = (at, node.label)
            following = node.next
        return longest
