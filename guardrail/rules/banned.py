"""The ``banned_patterns`` rule: regexes and phrases that must never reach the client.

Hold-back is sized by partial matching (the ``regex`` module's ``partial=True``): after each
piece of text, the earliest position where a match has started but not finished is where the
rule's safe prefix ends. Everything before it is released at once; ordinary text that cannot
start a match is never held. Each scan resumes at that position, so no text is scanned twice
except a pending partial match, and per-delta cost does not grow with the stream's length.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import regex
from mypy_extensions import mypyc_attr

from guardrail.core.rule import Checker, Hit, Verdict
from guardrail.rules.phrases import UNSPACED, PhraseIndex, indexable
from guardrail.rules.textview import FoldedChecker, fold_text

# Regexes run inside the event loop, after every delta: a pathological pattern must not stall
# every stream on the process. One search may take this long (the default of ``timeout``)...
PATTERN_TIMEOUT_SECONDS = 0.02
# ...and one scan of a piece of text, every search in it included, this long: past it the rule
# fails (and the guard fails closed). 45 ms is about 1000x the cost of an ordinary scan.
SCAN_BUDGET_SECONDS = 0.045

# A match pending over more than this many characters (a PEM block on its way) is searched again
# only once the text after its start has grown by a quarter, so a long pending match costs
# O(n log n) instead of a search of all of it after every delta.
SHORT_PENDING_CHARS = 64

# Phrase lists longer than this go to the word index (see guardrail.rules.phrases).
INDEX_PHRASES_FROM = 32

# Characters kept before the scan position so that \b, (?<!\w) and short lookbehinds see the
# text they need. Lookbehinds reaching further back than this see a truncated string.
LOOKBEHIND_CHARS = 64

# A match counts as final only once this many characters follow it (or the text has ended):
# a full match at the very end of the text may still change with more text ("password" then
# "s", a greedy "{20,}" that keeps growing, a lookahead like (?!\w) satisfied by end-of-text).
LOOKAHEAD_CHARS = 8

# A potential match held longer than this is treated as a match (failing closed), which bounds
# both memory and the cost of re-matching it on every delta. 8 KiB holds a PEM block of a
# 4096-bit RSA key (about 3.3 KB) with room to spare.
MAX_MATCH_CHARS = 8192

# Where a match can start is found by probing the pattern with one character after another, up to
# PREFIX_DEPTH characters deep, at load: the prefilter then runs only on deltas where a possible
# match prefix appears (such as "sk-" at a word start), not on every delta that holds an "s".
# The first character is probed below PROBED_BELOW (ASCII and the Latin blocks), the next ones
# in ASCII; every character above counts as a possible start or continuation, so text in other
# scripts is always searched: a prefilter can only skip.
PROBED_BELOW = 0x250
PREFIX_DEPTH = 3
PREFIX_NODES = 64  # prefixes probed past the first character, per pattern (each probes 128 characters)

_LEADING_FLAGS = regex.compile(r"\A\(\?([imsx]+)\)")
# A pattern led by a one-character negative lookbehind, such as (?<![A-Za-z0-9_-]): the lookbehind
# becomes part of the prefilter, and the rest is probed without context.
_LEADING_LOOKBEHIND = regex.compile(r"\A(?:\(\?([imsx]+)\))?\(\?<!((?:\\.|\[(?:\\.|[^\]\\])+\]|[^()\[\]\\|])+)\)")
# A regex token, so that what looks back can be found outside character classes.
_TOKEN = regex.compile(r"\\.|\[\^?\]?(?:\\.|[^\]\\])*\]|\(\?<[=!]|\(\?[a-zA-Z0-9]+\)|.", regex.DOTALL)
# Tokens whose outcome depends on the text before the match: what a prefix probe cannot see.
_LOOKS_BACK = regex.compile(r"\\[bBmMGA<>]|\^|\(\?<[=!]|\(\?[a-zA-Z0-9]+\)")
# What a one-character probe cannot see: a lookbehind that demands context, \B, \G.
_CONTEXTUAL = regex.compile(r"\(\?<=|\\B|\\G")
_NUMBERED_BACKREFERENCE = regex.compile(r"\\[1-9]|\\g<\d+>")
_WORD_CHAR = regex.compile(r"\w")
_UNPROBED = re.compile(f"[\\u{PROBED_BELOW:04x}-\\U0010ffff]")


def compile_pattern(pattern: str) -> None:
    """Check that ``pattern`` can be used in ``patterns``.

    Raises:
        ValueError: the pattern does not compile, or it matches the empty string.
    """
    try:
        compiled = regex.compile(pattern)
    except regex.error as exc:
        raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
    if compiled.search("") is not None:
        raise ValueError(f"pattern {pattern!r} matches the empty string, so it would match everywhere")


def phrase_pattern(phrase: str) -> str:
    """The regex for a literal phrase: case-insensitive, word-bounded, any whitespace between words.

    Raises:
        ValueError: the phrase is empty or only whitespace.
    """
    words = phrase.split()
    if not words:
        raise ValueError("phrase is empty")
    body = r"\s+".join(regex.escape(word) for word in words)
    # Bound only the edges made of word characters: "@admin" should still match "to @admin". Scripts
    # written without spaces between words (Hangul, Han, Kana, Thai...) attach particles and
    # neighbours to a word, so "비밀번호" must match in "비밀번호는": no boundary at such an edge.
    left = r"(?<!\w)" if _bounded(words[0][0]) else ""
    right = r"(?!\w)" if _bounded(words[-1][-1]) else ""
    return f"{left}(?i:{body}){right}"


def _bounded(char: str) -> bool:
    return _WORD_CHAR.match(char) is not None and UNSPACED.match(char) is None


@dataclass(frozen=True, slots=True)
class _Searcher:
    """One compiled regex and the label of each alternative it combines."""

    pattern: regex.Pattern[str]
    labels: tuple[str, ...]

    def label(self, match: regex.Match[str]) -> str:
        if len(self.labels) == 1:
            return self.labels[0]
        for index, label in enumerate(self.labels):
            if match.group(f"guardrail_alt_{index}") is not None:
                return label
        return self.labels[0]


def _scoped(pattern: str) -> str | None:
    """``pattern`` rewritten to combine safely with others, or None if it must stand alone."""
    if _NUMBERED_BACKREFERENCE.search(pattern):
        return None  # group numbers shift inside a combined pattern
    leading = _LEADING_FLAGS.match(pattern)
    if leading:
        pattern = f"(?{leading.group(1)}:{pattern[leading.end() :]})"
    if "(?" in pattern and regex.search(r"\(\?[a-zA-Z]+\)", pattern):
        return None  # a global flag further in would apply to every alternative
    return pattern


class _Prefix:
    """A node of the tree of prefixes a match can start with; a leaf allows any continuation."""

    __slots__ = ("children", "leaf")

    def __init__(self) -> None:
        self.children: dict[str, _Prefix] = {}
        self.leaf = True


@functools.lru_cache(maxsize=1024)
def _prefilter_branches(pattern: str) -> tuple[str, ...] | None:
    """Stdlib regex branches finding every character of a text where ``pattern`` could start a match.

    A match (or a match still partial at the end of the text) can only start where the text
    goes on with one of the pattern's possible prefixes: those are found by probing. A leading
    one-character negative lookbehind is kept, as a lookbehind after the first character. Every
    branch starts with a literal character, which lets the stdlib engine skip to the candidates.
    Characters from PROBED_BELOW on are left to the caller. None when the pattern looks back in
    ways a probe cannot see, or can match at once (then it runs on every delta).
    """
    behind = ""
    body = pattern
    leading = _LEADING_LOOKBEHIND.match(pattern)
    if leading and not _looks_back(leading.group(2)):
        flags = f"(?{leading.group(1)})" if leading.group(1) else ""
        lookbehind = regex.compile(f"{flags}(?<!{leading.group(2)})")
        barred = [chr(code) for code in range(PROBED_BELOW) if lookbehind.match(chr(code) + "x", 1) is None]
        behind = f"(?<!{_char_class(barred)}.)" if barred else ""
        body = flags + pattern[leading.end() :]
    if _looks_back(body):
        return _first_chars(regex.compile(pattern))
    root = _probe_prefixes(regex.compile(body))
    if root.leaf:
        return None
    return tuple(re.escape(char) + behind + _prefix_source(child) for char, child in root.children.items())


def _looks_back(pattern: str) -> bool:
    return any(_LOOKS_BACK.fullmatch(token) for token in _TOKEN.findall(pattern))


def _probe_prefixes(pattern: regex.Pattern[str]) -> _Prefix:
    root = _Prefix()
    root.leaf = False
    queue: list[tuple[str, _Prefix]] = [("", root)]
    budget = PREFIX_NODES
    while queue:
        prefix, node = queue.pop(0)
        alphabet = range(PROBED_BELOW) if not prefix else range(128)
        for code in alphabet:
            text = prefix + chr(code)
            match = pattern.match(text, partial=True)
            if match is None:
                continue
            if not match.partial and match.end() <= len(prefix):
                node.children.clear()
                node.leaf = True  # the prefix is a whole match already: any text may follow
                break
            node.children[text[-1]] = _Prefix()
        if node is root and node.leaf:
            break
        for char, child in node.children.items():
            if len(prefix) + 1 < PREFIX_DEPTH and budget > 0:
                budget -= 1
                child.leaf = False
                queue.append((prefix + char, child))
    return root


def _prefix_source(node: _Prefix) -> str:
    """A stdlib regex for the rest of the prefixes below ``node``, which may also end with the text."""
    if node.leaf:
        return ""
    by_rest: dict[str, list[str]] = {}
    for char, child in node.children.items():
        by_rest.setdefault(_prefix_source(child), []).append(char)
    branches = [_char_class(chars) + rest for rest, chars in by_rest.items()]
    branches.append("[^\\x00-\\x7f]")  # not probed: may go on with a match
    branches.append("\\Z")  # the text ends in a partial match
    return "(?:" + "|".join(branches) + ")"


def _first_chars(pattern: regex.Pattern[str]) -> tuple[str, ...] | None:
    """The characters at which ``pattern`` could start, probed after no text, a letter and a space."""
    if _CONTEXTUAL.search(pattern.pattern):
        return None
    starts = []
    for code in range(PROBED_BELOW):
        char = chr(code)
        for context in ("", "a", " "):
            match = pattern.match(context + char, len(context), partial=True)
            if match is not None and match.end() > match.start():
                starts.append(char)
                break
    return tuple(re.escape(char) for char in starts)


def _char_class(chars: Sequence[str]) -> str:
    """A stdlib character class of ``chars``: single characters, or ranges already written as regex."""
    if len(chars) == 1 and len(chars[0]) == 1:
        return re.escape(chars[0])
    codes = sorted(ord(c) for c in chars if len(c) == 1)
    parts = [c for c in chars if len(c) > 1]
    while codes:
        first = last = codes.pop(0)
        while codes and codes[0] == last + 1:
            last = codes.pop(0)
        parts.append(re.escape(chr(first)) if first == last else f"{re.escape(chr(first))}-{re.escape(chr(last))}")
    return "[" + "".join(parts) + "]"


def _prefilter(sources: Sequence[str]) -> re.Pattern[str] | None:
    """A stdlib regex finding any character where one of ``sources`` could start a match."""
    found = [_prefilter_branches(source) for source in sources]
    if any(branches is None for branches in found):
        return None
    branches = dict.fromkeys(branch for source in found for branch in source or ())
    return re.compile("|".join(branches) or "(?!)", re.DOTALL)


def _searcher(source: str, labels: tuple[str, ...]) -> _Searcher:
    return _Searcher(regex.compile(source), labels)


def _build_searchers(alternatives: Sequence[tuple[str, str]]) -> tuple[_Searcher, ...]:
    combinable: list[tuple[str, str]] = []
    alone: list[_Searcher] = []
    for source, label in alternatives:
        scoped = _scoped(source)
        if scoped is None:
            alone.append(_searcher(source, (label,)))
        else:
            combinable.append((scoped, label))
    if len(combinable) == 1:
        return (_searcher(combinable[0][0], (combinable[0][1],)), *alone)
    if combinable:
        joined = "|".join(f"(?P<guardrail_alt_{i}>{source})" for i, (source, _) in enumerate(combinable))
        try:
            combined = _searcher(joined, tuple(label for _, label in combinable))
        except regex.error:
            # e.g. two patterns defining the same group name: keep them apart.
            return (*(_searcher(s, (label,)) for s, label in combinable), *alone)
        return (combined, *alone)
    return tuple(alone)


@dataclass(frozen=True, slots=True)
class ScanPlan:
    """What every checker of one rule searches with: made once per rule, shared by its checkers."""

    searchers: tuple[_Searcher, ...]
    prefilter: re.Pattern[str] | None  # no match starts where this finds nothing (see _starts_nothing)
    timeout: float  # seconds one search may run
    singles: tuple[_Searcher, ...] = ()  # each alternative alone (see BannedPatternsChecker._overlapping)


@mypyc_attr(allow_interpreted_subclasses=True)
class BannedPatterns:
    """Text matching any of ``patterns`` (regex-module syntax) or ``phrases`` is banned.

    Args:
        patterns: regular expressions, compiled once here.
        phrases: literal phrases, matched case-insensitively on word boundaries (none at an
            edge written in a script without spaces, such as Hangul or Han); a run of
            whitespace in a phrase matches any run of whitespace in the text. Phrases made of
            word characters go to a word index (:mod:`guardrail.rules.phrases`), so that
            thousands of them cost about what one does.
        timeout: seconds one search may run before the rule fails (and the guard fails closed).
        normalize: check a folded view of the text (see :mod:`guardrail.rules.textview`), so
            that zero-width characters, soft hyphens, fullwidth letters or combining marks
            inside a match do not hide it; hits map back to the original text.

    Raises:
        ValueError: a pattern is invalid or matches the empty string, a phrase is empty, or
            both lists are empty.
    """

    # Strings outside text channels (ids, error messages, comments) are checked with this rule too.
    scans_fields = True

    def __init__(
        self,
        *,
        patterns: Sequence[str] = (),
        phrases: Sequence[str] = (),
        timeout: float = PATTERN_TIMEOUT_SECONDS,
        normalize: bool = False,
    ) -> None:
        if not patterns and not phrases:
            raise ValueError("banned_patterns needs at least one pattern or phrase")
        for pattern in patterns:
            compile_pattern(pattern)
        self.patterns = tuple(patterns)
        self.phrases = tuple(phrases)
        self.normalize = normalize
        if normalize:
            phrases = [fold_text(phrase) for phrase in phrases]
        alternatives = [(p, f"pattern {p!r}") for p in patterns]
        # A few phrases are cheapest in the regex (its prefilter skips text that cannot start one);
        # many are cheapest in the word index, whose cost does not grow with their number.
        indexed = [phrase for phrase in phrases if indexable(phrase)] if len(phrases) > INDEX_PHRASES_FROM else []
        alternatives += [(phrase_pattern(p), f"phrase {p!r}") for p in phrases if p not in indexed]
        self._index = PhraseIndex(indexed) if indexed else None
        self._plan = ScanPlan(
            _build_searchers(alternatives),
            _prefilter([source for source, _ in alternatives]) if alternatives else None,
            timeout,
            # Each alternative alone, to find a match that starts inside another's hit.
            tuple(_searcher(s, (label,)) for s, label in alternatives) if len(alternatives) > 1 else (),
        )

    def check_whole(self, text: str) -> tuple[Hit, ...]:
        """The hits in ``text`` read whole (an id, an error message): what a fresh checker finds.

        A string that not one character of can start a match (the prefilter's verdict, as a
        checker's first step would find) costs one search; any other goes through a checker.
        """
        if self._index is None and not self.normalize and _starts_nothing(self._plan.prefilter, text, 0):
            return ()
        checker = self.checker()
        return checker.feed(text).hits + checker.finish().hits

    def checker(self) -> Checker:
        """A fresh checker for one channel of one stream."""
        checker: Checker
        if not self._plan.searchers:
            assert self._index is not None
            checker = self._index.checker()
        else:
            checker = BannedPatternsChecker(self._plan)
            if self._index is not None:
                checker = _Both(checker, self._index.checker())
        return FoldedChecker(checker) if self.normalize else checker


def _starts_nothing(prefilter: re.Pattern[str] | None, text: str, start: int) -> bool:
    """Whether no match can start at or after ``start`` in ``text``, by the prefilter's probes.

    The prefilter sees the character before ``start``, for its lookbehinds; characters not
    probed (from PROBED_BELOW on) may start a match, so text holding one is always searched.
    """
    if prefilter is None or prefilter.search(text, start) is not None:
        return False
    return text.isascii() or _UNPROBED.search(text, start) is None


class _Both:
    """The regex checker and the phrase index's, as one: the lesser safe offset, every hit."""

    __slots__ = ("_first", "_second")

    def __init__(self, first: Checker, second: Checker) -> None:
        self._first = first
        self._second = second

    def feed(self, text: str) -> Verdict:
        one, two = self._first.feed(text), self._second.feed(text)
        return Verdict(min(one.safe, two.safe), one.hits + two.hits)

    def finish(self) -> Verdict:
        one, two = self._first.finish(), self._second.finish()
        return Verdict(min(one.safe, two.safe), one.hits + two.hits)


# The checkers of a channel's banned-pattern rules are fed the same text, one after another, and
# mostly hold the same tail: the first to join its tail and the text leaves the result here for
# the others (see BannedPatternsChecker.feed), so that a channel keeps one copy of its recent
# text rather than one per rule.
_last_join = ("", "", "")  # (tail, text, tail + text)


class BannedPatternsChecker:
    """Per-channel scan state: the unscanned tail of the text and where the next scan starts."""

    __slots__ = ("_base", "_plan", "_scan", "_searched_to", "_tail")

    def __init__(self, plan: ScanPlan) -> None:
        self._plan = plan
        self._tail = ""  # the text from offset _base on
        self._base = 0
        self._scan = 0  # no match can start before this offset, apart from hits already reported
        self._searched_to = 0  # the end of the text at the last search

    def feed(self, text: str) -> Verdict:
        """Scan the channel's next piece of text."""
        tail = self._tail
        start = len(tail)
        idle = self._scan == self._base + start  # no match can have started before the new text
        global _last_join  # (the join the channel's other checkers share: see _last_join)
        before, added, joined = _last_join
        if not (text is added and tail == before):
            joined = tail + text
            _last_join = (tail, text, joined)
        self._tail = tail = joined
        if idle and _starts_nothing(self._plan.prefilter, tail, start):
            # Not one character of it can start a match: keep it only as lookbehind context.
            self._scan += len(text)
            if len(tail) > 2 * LOOKBEHIND_CHARS:
                self._base += len(tail) - LOOKBEHIND_CHARS
                self._tail = tail[-LOOKBEHIND_CHARS:]
            return Verdict(self._scan)
        pending = self._scan - self._base
        if (
            not idle
            and start - pending > SHORT_PENDING_CHARS
            and (len(tail) - pending) * 4 < (self._searched_to - self._base - pending) * 5
        ):
            return Verdict(self._scan)  # a long pending match: searched again once it has grown by a quarter
        return self._scan_tail(final=False)

    def finish(self) -> Verdict:
        """The text is complete: pending partial matches either match now or never will."""
        return self._scan_tail(final=True)

    def _earliest(self, pos: int, final: bool, deadline: float) -> tuple[regex.Match[str], _Searcher] | None:
        best: tuple[regex.Match[str], _Searcher] | None = None
        for searcher in self._plan.searchers:
            match = self._search(searcher, pos, final, deadline)
            if match is not None and (best is None or match.start() < best[0].start()):
                best = (match, searcher)
        if best is not None and not final and not best[0].partial and best[0].start() > pos:
            # The regex module prefers a complete match to a partial one that starts earlier (an
            # alternation's phrase inside a private key still on its way): look for that partial.
            earlier = self._partial_before(pos, best[0].start())
            if earlier is not None:
                return earlier
        return best

    def _partial_before(self, pos: int, limit: int) -> tuple[regex.Match[str], _Searcher] | None:
        """The earliest match still partial at the end of the text that starts before ``limit``."""
        for searcher in self._plan.searchers:
            start = pos
            while start < limit:
                # A match partial at the end of the text is partial at ``limit`` too (no complete
                # match starts before it), so the text cut there finds its candidates.
                candidate = searcher.pattern.search(self._tail, start, limit, partial=True, timeout=self._plan.timeout)
                if candidate is None:
                    break
                whole = searcher.pattern.match(self._tail, candidate.start(), partial=True, timeout=self._plan.timeout)
                if whole is not None and whole.partial:
                    return whole, searcher
                start = candidate.start() + 1
        return None

    def _overlapping(
        self, start: int, stop: int, label: str, final: bool, deadline: float
    ) -> tuple[int, int, str, bool] | None:
        """The earliest match of another alternative that starts inside ``[start, stop)`` and ends after it."""
        best: tuple[int, int, str, bool] | None = None
        end = len(self._tail)
        for single in self._plan.singles:
            if single.labels[0] == label:
                continue
            match = self._search(single, start + 1, final, deadline)
            if match is None or match.start() >= stop or (match.end() <= stop and not match.partial):
                continue
            pending = match.partial or (not final and match.end() + LOOKAHEAD_CHARS > end)
            if best is None or match.start() < best[0]:
                best = (match.start(), match.end(), single.labels[0], pending)
        return best

    def _search(self, searcher: _Searcher, pos: int, final: bool, deadline: float) -> regex.Match[str] | None:
        """One search, within what is left of the scan's time budget (it ends at ``deadline``).

        The timeout is wall-clock time: a busy host can preempt an ordinary search past it, so a
        timed-out search is tried once more if the budget allows. A pattern that is really too
        slow runs out of the budget, and the rule fails.
        """
        for _ in range(2):
            left = deadline - time.perf_counter()
            if left <= 0.001:
                break
            try:
                return searcher.pattern.search(
                    self._tail, pos, partial=not final, timeout=min(self._plan.timeout, left)
                )
            except TimeoutError:
                continue
        label = searcher.labels[0] if len(searcher.labels) == 1 else "patterns"
        raise TimeoutError(
            f"{label} took over the {SCAN_BUDGET_SECONDS * 1000:.0f} ms a scan may take, "
            f"on {len(self._tail) - pos} characters"
        )

    def _scan_tail(self, *, final: bool) -> Verdict:
        hits: list[Hit] = []
        end = len(self._tail)
        deadline = time.perf_counter() + SCAN_BUDGET_SECONDS
        self._searched_to = self._base + end
        pos = self._scan - self._base
        while pos < end:
            found = self._earliest(pos, final, deadline)
            if found is None:
                pos = end
                break
            match, searcher = found
            start, stop = match.span()
            pending = match.partial or (not final and stop + LOOKAHEAD_CHARS > end)
            if pending and end - start <= MAX_MATCH_CHARS:
                pos = start
                break
            if pending:
                stop = end  # held too long: fail closed, treat what is held as the match
            elif stop == start:
                pos = start + 1  # a zero-width match bans nothing
                continue
            label = searcher.label(match)
            hits.append(Hit(self._base + start, self._base + stop, label))
            pos = stop
            # Another alternative may start inside this hit and reach past it: a key written
            # straight before "-----BEGIN RSA PRIVATE KEY-----" must not hide the PEM block.
            while (inner := self._overlapping(start, stop, label, final, deadline)) is not None:
                start, stop, label, pending = inner
                if pending and end - start <= MAX_MATCH_CHARS:
                    pos = start
                    break
                stop = end if pending else stop
                hits.append(Hit(self._base + start, self._base + stop, label))
                pos = stop
            else:
                continue
            break
        self._scan = self._base + pos
        cut = max(0, pos - LOOKBEHIND_CHARS)
        if cut:
            self._tail = self._tail[cut:]
            self._base += cut
        return Verdict(self._scan, tuple(hits))
