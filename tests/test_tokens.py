from __future__ import annotations

import ast
from pathlib import Path

import pytest
import regex
import tiktoken
import tiktoken_ext.openai_public
from hypothesis import given, settings, strategies as st

from guardrail.core import tokens
from guardrail.core.tokens import TokenCounter
from guardrail.exceptions import EncodingError
from guardrail.tokenizers import get_encoding

ENCODINGS = ["o200k_base", "cl100k_base"]

ENGLISH = ["The", " quick", " brown", " fox", ".", ",", "!", "?", " hello", "Hello", "World", "HTTPResponse", "x"]
CONTRACTIONS = [" don't", " I'LL", " it's", " we've", " they're", "'s", "'", "'l", "'r", "l", "t", "e"]
WHITESPACE = [" ", "  ", "    ", "\t", "\n", "\n\n", "\r\n", " \n", "\n  ", "   \n\n   ", "\u00a0", "\u3000"]
KOREAN_CJK = ["안녕하세요", " 세계", "한국어", "漢字", "かな"]
EMOJI_MARKS = ["🎉", "👩\u200d👩\u200d👧", "🇰🇷", "✨", "é", "e\u0301", "ʰ", "𝐀"]
DIGITS = ["1", "12", "123", "1234567", " 42", "3.14"]
CODE = ["def f(x):", "    return x", "{}", "[]", "()", "=>", "//", "/", "/*", "*/", "-----", "==="]
SPECIAL = ["<|endoftext|>", "<|endofprompt|>"]
NEWER_THAN_PYTHON = ["\u0558", "\U0001e4d0"]  # letters to regex (the second to tiktoken too), unassigned in Python 3.11
FRAGMENTS = ENGLISH + CONTRACTIONS + WHITESPACE + KOREAN_CJK + EMOJI_MARKS + DIGITS + CODE + SPECIAL + NEWER_THAN_PYTHON


@pytest.fixture(scope="module", params=ENCODINGS)
def encoding(request: pytest.FixtureRequest) -> tiktoken.Encoding:
    name: str = request.param
    return get_encoding(name)


def reference_count(encoding: tiktoken.Encoding, text: str) -> int:
    # Answers are counted as ordinary text: "<|endoftext|>" in an answer is not a special token.
    return len(encoding.encode(text, disallowed_special=()))


def token_boundaries(encoding: tiktoken.Encoding, text: str) -> set[int]:
    """Character offsets where a token of the whole text's encoding ends (for texts without surrogates)."""
    ids = encoding.encode_ordinary(text)
    ends = set()
    for count in range(len(ids) + 1):
        try:
            ends.add(len(encoding.decode_bytes(ids[:count]).decode("utf-8")))
        except UnicodeDecodeError:
            continue  # the token ends inside a character
    return ends


def texts(min_fragments: int, max_fragments: int) -> st.SearchStrategy[str]:
    fragment = st.sampled_from(FRAGMENTS) | st.text(max_size=6)
    return st.lists(fragment, min_size=min_fragments, max_size=max_fragments).map("".join)


@st.composite
def chunked(draw: st.DrawFn, source: st.SearchStrategy[str]) -> list[str]:
    """A text cut into deltas of 1 to ``largest`` characters."""
    text = draw(source)
    largest = draw(st.integers(1, 12))
    randoms = draw(st.randoms(use_true_random=False))
    deltas = []
    start = 0
    while start < len(text):
        size = randoms.randint(1, largest)
        deltas.append(text[start : start + size])
        start += size
    return deltas


@settings(max_examples=300, deadline=None)
@given(deltas=chunked(texts(20, 150)))
def test_count_is_exact_after_every_delta(encoding: tiktoken.Encoding, deltas: list[str]) -> None:
    counter = TokenCounter(encoding)
    seen = ""
    for delta in deltas:
        seen += delta
        assert counter.feed(delta) == reference_count(encoding, seen)
        assert counter.count == reference_count(encoding, seen)
        assert counter.stable_length <= len(seen)


@settings(max_examples=150, deadline=None)
@given(deltas=chunked(texts(1, 30)), data=st.data())
def test_prefix_for_is_the_longest_fitting_token_boundary(
    encoding: tiktoken.Encoding, deltas: list[str], data: st.DataObject
) -> None:
    counter = TokenCounter(encoding)
    released: dict[int, int] = {}
    for delta in deltas:
        counter.feed(delta)
        for budget in range(counter.count + 1):
            stable = counter.stable_prefix_for(budget)
            assert stable <= counter.stable_length
            assert stable >= released.get(budget, 0), "what was released stays releasable"
            released[budget] = stable
    text = "".join(deltas)
    boundaries = token_boundaries(encoding, text)
    for budget in data.draw(st.sets(st.integers(0, counter.count + 1), min_size=1, max_size=6)):
        cut = counter.prefix_for(budget)
        fitting = [end for end in boundaries if reference_count(encoding, text[:end]) <= budget]
        assert cut == max(fitting)
        assert counter.count_prefix(cut) == reference_count(encoding, text[:cut])
        assert cut >= released.get(budget, 0), "the final cut never takes back released text"
    length = data.draw(st.integers(0, len(text)))
    assert counter.count_prefix(length) == reference_count(encoding, text[:length])


PROSE = (
    "Streaming hides latency: words appear as they are generated. But a stream is hard to guard, "
    "since the full answer is never in hand. Here's a function:\n\n```python\ndef total(xs):\n"
    "    return sum(x * 2 for x in xs)\n```\n\nIt doesn't allocate; it's O(n) and handles 1,234,567 "
    "items. 한국어 문장도 섞여 있습니다. Emoji 🎉 too! "
) * 4


@pytest.mark.parametrize("budget", [1, 37, 150])
def test_prefix_for_cuts_prose_at_exactly_the_budget(encoding: tiktoken.Encoding, budget: int) -> None:
    counter = TokenCounter(encoding)
    for start in range(0, len(PROSE), 3):
        counter.feed(PROSE[start : start + 3])
    cut = counter.prefix_for(budget)
    assert reference_count(encoding, PROSE[:cut]) == budget
    assert cut in token_boundaries(encoding, PROSE)


def test_prefix_for_returns_everything_within_budget(encoding: tiktoken.Encoding) -> None:
    counter = TokenCounter(encoding)
    counter.feed("Hello world")
    assert counter.prefix_for(counter.count) == len("Hello world")
    assert counter.prefix_for(0) == 0
    with pytest.raises(ValueError, match="zero or more"):
        counter.prefix_for(-1)
    with pytest.raises(ValueError, match="outside the text"):
        counter.count_prefix(12)


def test_tail_stays_short_over_a_long_stream(encoding: tiktoken.Encoding) -> None:
    # What makes the cost per delta flat: the re-encoded tail does not grow with the stream.
    counter = TokenCounter(encoding)
    text = PROSE * 40
    longest_tail = 0
    for start in range(0, len(text), 4):
        counter.feed(text[start : start + 4])
        longest_tail = max(longest_tail, min(start + 4, len(text)) - counter.stable_length)
    assert counter.count == reference_count(encoding, text)
    assert longest_tail <= 40


@pytest.mark.parametrize(
    "deltas",
    [
        ["ab\ud83d", "\ude00cd ef"],  # a surrogate pair split across deltas: tiktoken re-pairs it
        ["x\ud835", "\udc00bc def ghi"],  # ...into a letter (U+1D400), which regex sees as two symbols
        ["lone \ud800 high", " and \udfff low, end"],
        ["\u0558\u0558ab", "c de", "f gh"],  # letters newer than Python's Unicode tables
        ["a\U0001e4d0", "\U0001e4d0 b", "c d"],
    ],
)
def test_uncertain_characters_are_counted_exactly(encoding: tiktoken.Encoding, deltas: list[str]) -> None:
    counter = TokenCounter(encoding)
    seen = ""
    for delta in deltas:
        seen += delta
        assert counter.feed(delta) == len(encoding.encode_ordinary(seen))
    for length in range(len(seen) + 1):
        assert counter.count_prefix(length) == len(encoding.encode_ordinary(seen[:length]))
    assert counter.stable_length > 0, "the tail froze again after the uncertain characters"


def test_special_token_text_is_ordinary_text(encoding: tiktoken.Encoding) -> None:
    counter = TokenCounter(encoding)
    counter.feed("end: <|endof")
    assert counter.feed("text|> more") == len(encoding.encode_ordinary("end: <|endoftext|> more"))
    assert counter.count > 3


def test_empty_delta_changes_nothing(encoding: tiktoken.Encoding) -> None:
    counter = TokenCounter(encoding)
    assert counter.feed("") == 0
    counter.feed("Hello")
    assert counter.feed("") == counter.count == 1


def test_patterns_are_tiktokens(encoding: tiktoken.Encoding) -> None:
    assert encoding._pat_str in tokens._UNSTABLE_PIECES
    assert tiktoken_ext.openai_public.r50k_pat_str == tokens._R50K_PATTERN


# One character of each class the patterns tell apart, and the letters of contractions.
CLASS_ALPHABET = list("'sltvrmdSLTVRaAz !./\t\n\r12") + ["\u00a0", "\u3000", "가", "ʰ", "\u0301", "ǅ", "😀"]


@pytest.mark.parametrize(
    "pattern", [tokens._O200K_PATTERN, tokens._CL100K_PATTERN, tokens._R50K_PATTERN], ids=["o200k", "cl100k", "r50k"]
)
@settings(max_examples=700, deadline=None)
@given(
    head=st.lists(st.sampled_from(CLASS_ALPHABET), min_size=1, max_size=10).map("".join),
    more=st.lists(st.sampled_from(CLASS_ALPHABET), min_size=1, max_size=6).map("".join),
)
def test_only_the_last_pieces_change_when_text_is_appended(pattern: str, head: str, more: str) -> None:
    compiled = regex.compile(pattern)
    before = [match.span() for match in compiled.finditer(head)]
    after = [match.span() for match in compiled.finditer(head + more)]
    settled = before[: max(len(before) - tokens._UNSTABLE_PIECES[pattern], 0)]
    assert after[: len(settled)] == settled


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(exclude_categories=("Cn", "Cs")), max_size=40))
def test_regex_splits_like_tiktoken_for_assigned_characters(encoding: tiktoken.Encoding, text: str) -> None:
    # The counter finds pieces with the regex module; this is the assumption that makes it exact.
    assert encoding._encode_only_native_bpe(text) == encoding.encode_ordinary(text)


class UnknownEncoding:
    name = "custom"
    _pat_str = r"\w+|\s+|."

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode())

    def decode_tokens_bytes(self, tokens: list[int]) -> list[bytes]:
        return [bytes([token]) for token in tokens]


def test_unknown_pretokenizer_is_refused() -> None:
    with pytest.raises(EncodingError, match="'custom'"):
        TokenCounter(UnknownEncoding())


def test_core_module_imports_no_io_library() -> None:
    source = (Path(__file__).resolve().parent.parent / "guardrail" / "core" / "tokens.py").read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"tiktoken", "anyio", "asyncio", "starlette", "httpx", "prometheus_client", "time"}
