"""The banned_patterns prefilter: it may only skip text where no match, whole or partial, can start.

The prefilter is built by probing each pattern at load; these tests hold it against the pattern
itself on texts dense in the characters the patterns start with, so that a wrong prefix tree
(a leaked match start) shows up as a counterexample.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import regex
import yaml
from hypothesis import given, settings, strategies as st

from guardrail.core.rule import Checker, Verdict
from guardrail.rules.banned import PROBED_BELOW, BannedPatterns, BannedPatternsChecker, phrase_pattern

ROOT = Path(__file__).resolve().parent.parent


def pack_patterns(name: str) -> list[str]:
    document = yaml.safe_load((ROOT / "rules" / name).read_text())
    patterns: list[str] = []
    for rule in document["rules"]:
        patterns += rule.get("patterns", [])
        patterns += [phrase_pattern(phrase) for phrase in rule.get("phrases", [])]
    return patterns


# Patterns exercising each way the prefilter is built: a leading negative lookbehind, case
# folding (including the long s and the Kelvin sign), lookaheads, \b, a leading \b that sends
# the pattern to the first-character probe, a positive lookbehind (no prefilter at all),
# alternatives of different lengths, optional characters, and a start above the probed range.
CRAFTED = [
    r"(?<![\w-])(?i:skip)-\d{2}",
    r"\bpass(?:word|phrase)?\b",
    r"(?i)kelvin\s*=\s*\d+",
    r"ab(?!c)|abcd",
    r"x?yz{2,}",
    r"(?<=key=)[a-z]{4}",
    r"(?<!\d)\d(?:\.\d+)?%",
    r"한국어|日本",
    r"(?<![A-Z])[A-Z]{2}\d",
    r"-{3}[^-]",
    r"(?i)(?<!\w)risk\b",
]
PATTERNS = list(dict.fromkeys(pack_patterns("default.yaml") + pack_patterns("secrets.yaml") + CRAFTED))

FRAGMENTS = [
    "sk-",
    "sk-proj-",
    "sk-ant-",
    "sk_live_",
    "rk_",
    "AKIA",
    "ASIA",
    "AIza",
    "aws_secret_access_key",
    "AWS_SECRET",
    "secretaccesskey",
    "ſecret",
    "ghp_",
    "github_pat_",
    "xoxb-",
    "eyJ",
    ".eyJ",
    "-----BEGIN",
    "PRIVATE KEY-----",
    "123-45-",
    "6789",
    "4111 ",
    "5500-",
    "6011",
    "project ",
    "Starlight",
    "nightjar",
    "skip-",
    "\u212aelvin",
    "awſ_ſecret_access_key",
    "riſk",
    "kelvin =",
    "password",
    "abc",
    "xyz",
    "zz",
    "key=",
    "50.5%",
    "한국",
    "日本",
    " a",
    " A",
    "-",
    "---",
    " ",
    "\n",
    "_",
    "=",
    ":",
    '"',
    "'",
    "0",
    "9",
    "é",
    "ß",
]
ALPHABET = "".join(sorted(set("".join(FRAGMENTS) + "abcdefgksyzAKSJ0123456789 -_.=:\n\t%é")))
texts = st.lists(st.sampled_from(FRAGMENTS) | st.text(ALPHABET, max_size=6), max_size=12).map("".join)


def prefilter_of(patterns: list[str]) -> re.Pattern[str] | None:
    return BannedPatterns(patterns=patterns)._plan.prefilter


@settings(max_examples=400, deadline=None)
@given(text=texts)
def test_the_prefilter_finds_every_position_where_a_match_can_start(text: str) -> None:
    for source in PATTERNS:
        prefilter = prefilter_of([source])
        if prefilter is None:
            continue
        pattern = regex.compile(source)
        for pos in range(len(text)):
            match = pattern.match(text, pos, partial=True)
            if match is not None and (match.partial or match.end() > pos):
                # Characters from PROBED_BELOW on are searched whenever a delta holds one.
                assert prefilter.match(text, pos) or ord(text[pos]) >= PROBED_BELOW, (source, text, pos, match)


def test_the_prefilter_skips_ordinary_words() -> None:
    prefilter = prefilter_of(pack_patterns("default.yaml"))
    assert prefilter is not None
    for word in (" the", " answer", " is", " seven", " years", " risk", " asks", " awesome", "."):
        assert prefilter.search("Hello" + word, len("Hello")) is None, word
    for possible_start in (" sk", " sk-", " aws", " AKIA", " a", "-", " 123", " project"):
        assert prefilter.search("Hello" + possible_start, len("Hello")) is not None, possible_start


def test_a_pattern_that_looks_back_past_its_start_runs_on_every_delta() -> None:
    assert prefilter_of([r"(?<=key=)[a-z]{4}"]) is None


def scan(checker: Checker, pieces: list[str]) -> list[Verdict]:
    return [checker.feed(piece) for piece in pieces] + [checker.finish()]


@settings(max_examples=300, deadline=None)
@given(text=texts, cuts=st.lists(st.integers(0, 80), max_size=10))
def test_verdicts_are_the_same_with_and_without_the_prefilter(text: str, cuts: list[int]) -> None:
    rule = BannedPatterns(patterns=PATTERNS)
    bounds = sorted({0, len(text), *(cut for cut in cuts if cut < len(text))})
    pieces = [text[start:end] for start, end in zip(bounds, bounds[1:], strict=False)]
    filtered = rule.checker()
    unfiltered = BannedPatternsChecker(replace(rule._plan, prefilter=None))
    assert scan(filtered, pieces) == scan(unfiltered, pieces)


def test_a_match_starting_above_the_probed_characters_is_found() -> None:
    rule = BannedPatterns(patterns=["비밀번호", r"(?<!\w)Ωmega"], phrases=["東京 タワー"])
    for text, start in (("제 비밀번호는", 2), ("say Ωmega", 4), ("東京 タワー", 0)):
        checker = rule.checker()
        verdicts = [checker.feed(text), checker.finish()]
        assert [hit.start for verdict in verdicts for hit in verdict.hits] == [start], text


@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_a_string_read_whole_has_the_hits_a_fresh_checker_finds(text: str) -> None:
    # Ids, error messages and comments are checked whole; the prefilter spares most of them a scan.
    for rule in (
        BannedPatterns(patterns=PATTERNS),
        BannedPatterns(patterns=pack_patterns("default.yaml"), normalize=True),
        BannedPatterns(patterns=[r"(?<=key=)[a-z]{4}"]),  # no prefilter at all
    ):
        checker = rule.checker()
        assert rule.check_whole(text) == checker.feed(text).hits + checker.finish().hits, text


def test_a_string_read_whole_finds_a_key_and_skips_an_id() -> None:
    rule = BannedPatterns(patterns=pack_patterns("default.yaml"))
    key = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0K1l2"
    assert [(hit.start, hit.end) for hit in rule.check_whole(f"id {key}!")] == [(3, 3 + len(key))]
    assert rule.check_whole("chatcmpl-AbCdEfGh") == ()


def test_checkers_fed_one_text_keep_their_own_tails() -> None:
    """The checkers of a channel share a joined tail only when theirs are equal; each still finds its own matches."""
    rule = BannedPatterns(patterns=[r"(?<![a-z])key-[0-9]{4}"])
    first, second, third = rule.checker(), rule.checker(), rule.checker()
    first.feed("the key-")
    second.feed("a key-")
    third.feed("the key-")
    text = "1234 and more"
    hits = [checker.feed(text).hits + checker.finish().hits for checker in (first, second, third)]
    assert [[(hit.start, hit.end) for hit in found] for found in hits] == [[(4, 12)], [(2, 10)], [(4, 12)]]
