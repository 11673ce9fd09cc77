"""Phrases in scripts without spaces, Unicode tricks with ``normalize: true``, and phrase lists at scale."""

from __future__ import annotations

import itertools
import json
import time

import pytest
import regex
from hypothesis import example, given, settings, strategies as st

from guardrail.core.engine import StreamGuard
from guardrail.core.outputs import Send
from guardrail.core.rule import Action, BoundRule
from guardrail.rules.banned import INDEX_PHRASES_FROM, BannedPatterns, phrase_pattern


def client_text(rule: BannedPatterns, text: str, *, byte_step: int) -> str:
    """``text`` streamed as one chat chunk per character, its bytes fed ``byte_step`` at a time."""
    guard = StreamGuard([BoundRule("banned", rule, Action.REDACT, replacement="[x]")])
    body = b"".join(
        b"data: "
        + json.dumps({"choices": [{"index": 0, "delta": {"content": char}}]}, ensure_ascii=False).encode()
        + b"\n\n"
        for char in text
    )
    outputs = [o for i in range(0, len(body), byte_step) for o in guard.feed(body[i : i + byte_step])]
    outputs += guard.feed(b"data: [DONE]\n\n") + guard.close()
    wire = b"".join(o.data for o in outputs if isinstance(o, Send))
    chunks = [json.loads(line[6:]) for line in wire.decode().split("\n\n") if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


@pytest.mark.parametrize("byte_step", [1, 2, 5, 4096])
def test_a_korean_phrase_is_redacted_before_its_particle(byte_step: int) -> None:
    rule = BannedPatterns(phrases=["비밀번호", "project starlight"])
    assert client_text(rule, "관리자 비밀번호는 1234", byte_step=byte_step) == "관리자 [x]는 1234"


@pytest.mark.parametrize("text", ["東京タワーの秘密", "これは東京タワーです"])
def test_han_and_kana_phrases_match_without_spaces(text: str) -> None:
    rule = BannedPatterns(phrases=["東京タワー"])
    assert "東京タワー" not in client_text(rule, text, byte_step=3)


def test_latin_phrases_keep_their_word_boundaries() -> None:
    rule = BannedPatterns(phrases=["비밀번호", "project starlight"])
    assert client_text(rule, "project starlights", byte_step=1) == "project starlights"
    assert client_text(rule, "Project\n Starlight!", byte_step=1) == "[x]!"


TRICKS = {
    "zero-width space": "proj\u200bect starlight",
    "soft hyphen": "project star\u00adlight",
    "fullwidth letters": "ｐｒｏｊｅｃｔ ｓｔａｒｌｉｇｈｔ",
    "combining mark": "proje\u0301ct starlight",
    "word joiner and variation selector": "pro\u2060ject star\ufe0flight",
}


@pytest.mark.parametrize("trick", list(TRICKS))
def test_normalize_catches_unicode_tricks_and_keeps_every_other_byte(trick: str) -> None:
    text = f"Noël: «{TRICKS[trick]}» — ok 😀"
    plain = BannedPatterns(phrases=["project starlight"])
    normalized = BannedPatterns(phrases=["project starlight"], normalize=True)
    assert client_text(plain, text, byte_step=7) == text  # the trick works without the option
    assert client_text(normalized, text, byte_step=7) == "Noël: «[x]» — ok 😀"


def test_normalize_applies_to_patterns_and_to_phrases_written_with_accents() -> None:
    rule = BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"], phrases=["café secret"], normalize=True)
    text = "key ｓｋ-" + "Ａ" * 22 + " and CAFE\u0301 SECRET."
    assert client_text(rule, text, byte_step=3) == "key [x] and [x]."


def test_ten_thousand_phrases_load_fast_and_do_not_trip_on_their_own_words() -> None:
    words = [f"w{n:05d}x" for n in range(3000)]
    phrases = [f"{words[n % 3000]} {words[(n * 7 + 3 * (n // 3000)) % 3000]}" for n in range(10_000)]
    assert len(set(phrases)) == 10_000
    started = time.perf_counter()
    rule = BannedPatterns(phrases=phrases)
    assert time.perf_counter() - started < 10  # generous: the benchmark measures ~0.1 s
    prose = " ".join(words[(n * 13) % 3000] for n in range(2000))  # their vocabulary, never in their order
    assert client_text(rule, prose[:3000], byte_step=4096) == prose[:3000]
    assert client_text(rule, f"a {phrases[1234].upper()} b", byte_step=1) == "a [x] b"


def test_a_word_the_text_stops_in_is_held_only_if_it_may_begin_a_phrase() -> None:
    """Held: what may grow into a first word, or continue a phrase begun before it. Released: the rest."""
    phrases = [f"first{n} second{n} third{n}" for n in range(INDEX_PHRASES_FROM + 1)]
    rule = BannedPatterns(phrases=phrases)
    assert rule.checker().feed("say firs").safe == len("say ")  # may become "first0"
    assert rule.checker().feed("say second").safe == len("say second")  # begins no phrase
    assert rule.checker().feed("say first3 seco").safe == len("say ")  # "first3 second3..." on its way
    assert rule.checker().feed("say first3 second4").safe == len("say first3 second4")  # follows no first3
    checker = rule.checker()
    assert checker.feed("say first3 second3 thi").safe == len("say ")
    verdict = checker.feed("rd3.")
    assert [(hit.start, hit.end) for hit in verdict.hits] == [(4, len("say first3 second3 third3"))]


def test_a_pattern_still_on_its_way_is_held_though_a_later_phrase_is_complete() -> None:
    """The regex module prefers a complete match to an earlier partial one; the guard must not."""
    pem = r"-----BEGIN[A-Z ]{0,20}PRIVATE KEY-----[A-Za-z0-9+/=\s]{0,400}?-----END[A-Z ]{0,20}PRIVATE KEY-----"
    rule = BannedPatterns(patterns=[pem], phrases=["project starlight"])
    checker = rule.checker()
    assert checker.feed("-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJB").safe == 0
    # The phrase inside the key's body is complete, but the key (which contains it) is not: hold from its start.
    assert checker.feed("tlights PROJECT\nstarlight").safe == 0
    verdict = checker.feed("LInFEX6Ppy1tPf9\n-----END RSA PRIVATE KEY----- and then some more text")
    assert [(hit.start, hit.detail.startswith("pattern")) for hit in verdict.hits] == [(0, True)]


# --- the word index finds what the phrases' regexes find ----------------------------------------

INDEX_WORDS = ["alpha", "beta", "gamma", "d3lta", "eps_1", "zeta", "Éta", "thé", "x"]
INDEXED = [f"{a} {b}" for a in INDEX_WORDS for b in INDEX_WORDS] + ["alpha beta gamma", "thé x zeta"]


def regex_phrase_hits(text: str) -> set[tuple[int, int]]:
    """Each position's longest phrase, found with the phrases' own regexes."""
    compiled = [(len(p.split()), regex.compile(phrase_pattern(p))) for p in INDEXED]
    hits = set()
    for start in range(len(text)):
        found = [(words, m.end()) for words, pattern in compiled if (m := pattern.match(text, start))]
        if found:
            hits.add((start, max(found)[1]))
    return hits


# The words in both cases, and what sits beside words: whitespace (form feed and a no-break
# space too; the file separator, which str.isspace() takes for whitespace and Unicode does not),
# punctuation, word characters that are not letters, an accented letter and a combining mark.
PIECES = [*INDEX_WORDS, *(word.upper() for word in INDEX_WORDS)]
PIECES += [" ", "  ", "\n", "\t", "\x0c", "\x1c", ".", "-", "_", "9", "é", "\u0301", "\u00a0"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(PIECES), max_size=40),
    st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=8),
)
@example(["alpha", "\x1c", "beta", " "], [3])  # not whitespace to the phrases' regexes
@example(["ALPHA", "\x0c", "beta", "\u0301"], [2, 5])  # whitespace; then a mark ends no word
def test_the_word_index_finds_exactly_what_the_phrase_regexes_find(pieces: list[str], steps: list[int]) -> None:
    text = "".join(pieces)
    rule = BannedPatterns(phrases=INDEXED)
    assert len(INDEXED) > INDEX_PHRASES_FROM  # (so the rule uses the word index)
    checker = rule.checker()
    hits: set[tuple[int, int]] = set()
    at = 0
    for step in itertools.cycle(steps):
        if at >= len(text):
            break
        hits.update((hit.start, hit.end) for hit in checker.feed(text[at : at + step]).hits)
        at += step
    hits.update((hit.start, hit.end) for hit in checker.finish().hits)
    assert hits == regex_phrase_hits(text)
