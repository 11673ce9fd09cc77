"""Exact token counts for a growing text, at a cost per delta that does not grow with the text.

After every delta the guard needs exactly ``len(encoding.encode_ordinary(text_so_far))``.
Re-encoding the whole text each time is quadratic over a stream, so `TokenCounter` keeps a
frozen prefix whose token count is a number and re-encodes only the unstable tail.

Why the tail can be small
-------------------------
tiktoken splits text with a regex (the encoding's ``_pat_str``) into pieces and encodes each
piece on its own, so token counts add up over pieces. The regex runs left to right, and a
piece can change when text is appended only if matching it looked at the end of the text.
For the patterns tiktoken ships:

* cl100k_base: an alternative that is not whitespace looks at most one character past its
  match, and whitespace reaching the end of the text is one piece (``\\s++$``). Only the
  last piece can change: ``"Hel" + "lo"``, ``"12" + "34"``, ``"x " + "y"``.
* o200k_base: also the second-to-last piece. Trailing whitespace can be two pieces
  (``\\s*[\\r\\n]+`` then ``\\s+(?!\\S)``), which ``"\\n"`` merges again; and a letter piece
  tries a contraction up to three characters past its end, so ``"don" "'"`` becomes
  ``"don't"`` when ``"t"`` arrives. What it looked at is then one piece (``"'"``, ``"'r"``).
* r50k_base, p50k and gpt2: also the second-to-last piece, because ``'(?:ll|ve|re)`` looks
  two characters past an apostrophe: ``"'" "l"`` becomes ``"'ll"``.

Everything before the last one or two pieces (`_UNSTABLE_PIECES`) is therefore final.
Each delta costs one regex scan and two encodes of the tail (those pieces plus the delta).

Characters tiktoken may classify differently
--------------------------------------------
Pieces are found with the ``regex`` module (as tiktoken's own ``_encode_only_native_bpe``
does); tiktoken itself uses Rust's regex, whose Unicode tables are of another version. They
agree on every character assigned in Python's Unicode tables (checked for every code point
with Python 3.11, regex 2026.11 and tiktoken 0.14). Characters Python calls unassigned, and
surrogates (tiktoken re-pairs or replaces them), are uncertain: no boundary is frozen from a
split that depends on one. Past the last of them the tail freezes again at the first letter
followed by a character that cannot continue a letter piece, which ends a piece whatever the
uncertain characters are.

Cost
----
CPU per delta is linear in the delta plus the unstable tail, whatever came before. The tail
is a few characters for prose, code, CJK or emoji. A single piece that keeps growing (20,000
newlines in a row, a letter run with no break) stays in the tail, and each delta then costs
time linear in that piece, as encoding it does for tiktoken: callers that must bound hostile
streams can cap ``length - stable_length``. Memory grows linearly with the text, which
`prefix_for` needs.

Special tokens are counted as the ordinary text they are (``encode_ordinary``): an answer
containing ``<|endoftext|>`` is text, and must neither crash the count nor count as one token.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from array import array
from bisect import bisect_left, bisect_right
from typing import Final, Protocol

import regex

from guardrail.exceptions import EncodingError

__all__ = ["BPEEncoding", "TokenCounter"]


class BPEEncoding(Protocol):
    """What `TokenCounter` uses of a ``tiktoken.Encoding``."""

    @property
    def name(self) -> str: ...

    @property
    def _pat_str(self) -> str: ...

    def encode_ordinary(self, text: str) -> list[int]: ...

    def decode_tokens_bytes(self, tokens: list[int]) -> list[bytes]: ...


# The pre-tokenizer patterns of tiktoken_ext/openai_public.py, copied because the core does not
# import tiktoken; tests check they still equal tiktoken's.
_R50K_PATTERN: Final = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K_PATTERN: Final = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
_O200K_PATTERN: Final = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# How many trailing pieces of each pattern may still change when text is appended (module docstring).
_UNSTABLE_PIECES: Final = {_O200K_PATTERN: 2, _CL100K_PATTERN: 1, _R50K_PATTERN: 2}

# Unassigned in Python's Unicode tables, or a surrogate: tiktoken may class these differently.
_UNCERTAIN_CATEGORIES: Final = frozenset({"Cn", "Cs"})
_SURROGATE: Final = re.compile(f"[{chr(0xD800)}-{chr(0xDFFF)}]")


@functools.cache
def _compile(pattern: str) -> regex.Pattern[str]:
    return regex.compile(pattern)


class TokenCounter:
    """Counts the tokens of a text fed in deltas, exactly, without re-encoding what is settled.

    One counter per stream; not thread-safe. See the module docstring for why it is exact.
    """

    def __init__(self, encoding: BPEEncoding) -> None:
        """Start counting an empty text.

        Args:
            encoding: a ``tiktoken.Encoding`` (see `guardrail.tokenizers.get_encoding`).

        Raises:
            EncodingError: the encoding's pre-tokenizer is not one whose stability is known.
        """
        depth = _UNSTABLE_PIECES.get(encoding._pat_str)
        if depth is None:
            raise EncodingError(
                f"encoding {encoding.name!r}: its pre-tokenizer pattern is not one of tiktoken's o200k, cl100k or "
                "r50k patterns, so guardrail cannot count its tokens incrementally"
            )
        self._encoding = encoding
        self._encode = encoding.encode_ordinary
        self._pieces = _compile(encoding._pat_str)
        self._depth = depth
        self._chunks: list[str] = []
        self._chunk_ends = array("q")
        self._length = 0
        self._frozen_at = 0
        self._frozen_count = 0
        self._tail = ""
        self._tail_count = 0
        self._last_uncertain = -1
        # One record per advance of the frozen boundary: where it is, the token count before it, and
        # the length of the text when it was frozen (it is final for every text extending that prefix).
        self._record_at = array("q", [0])
        self._record_count = array("q", [0])
        self._record_seen = array("q", [0])

    @property
    def count(self) -> int:
        """The number of tokens in everything fed so far."""
        return self._frozen_count + self._tail_count

    @property
    def stable_length(self) -> int:
        """How many leading characters are settled: their tokens cannot change, whatever comes next."""
        return self._frozen_at

    def feed(self, text: str) -> int:
        """Append a delta.

        Args:
            text: the next piece of the stream, of any length.

        Returns:
            The exact token count of everything fed so far.
        """
        if not text:
            return self.count
        start = self._length
        self._chunks.append(text)
        self._length += len(text)
        self._chunk_ends.append(self._length)
        if not text.isascii():
            self._note_uncertain(text, start)
        tail = self._tail + text
        tail_count = len(self._encode(tail))
        cut = self._stable_cut(tail)
        if cut:
            # `cut` starts a piece, so the tail's tokens split there: what precedes it is the difference.
            rest = tail[cut:]
            rest_count = len(self._encode(rest))
            self._frozen_at += cut
            self._frozen_count += tail_count - rest_count
            self._record_at.append(self._frozen_at)
            self._record_count.append(self._frozen_count)
            self._record_seen.append(self._length)
            tail, tail_count = rest, rest_count
        self._tail = tail
        self._tail_count = tail_count
        return self.count

    def count_prefix(self, length: int) -> int:
        """Count the tokens of the first ``length`` characters, encoded on their own.

        Args:
            length: a prefix length, from 0 to the length of the text fed so far.

        Returns:
            ``len(encoding.encode_ordinary(text[:length]))``, in time bounded by the unstable tail.

        Raises:
            ValueError: ``length`` is negative or longer than the text.
        """
        if not 0 <= length <= self._length:
            raise ValueError(f"prefix length {length} outside the text (0..{self._length})")
        if length == self._length:
            return self.count
        record = bisect_right(self._record_seen, length) - 1
        start = self._record_at[record]
        return self._record_count[record] + len(self._encode(self._slice(start, length)))

    def prefix_for(self, max_tokens: int) -> int:
        """Find where to cut the text so that at most ``max_tokens`` tokens are released.

        Returns the length of the longest prefix that ends on a token boundary of the whole
        text's encoding and encodes, on its own, to at most ``max_tokens`` tokens. Usually it
        encodes to exactly ``max_tokens``; fewer when no boundary allows it (a character that
        spans several tokens, or last pieces that encode differently once cut).

        The text fed so far is taken as the whole answer, which is right when the stream ends
        here (an abort). Boundaries in the unstable tail are those of the current encoding and
        can vanish when more text arrives (``"Hel"`` ends a token until ``"lo"`` comes), so the
        result can shrink later. To release text while the stream runs, use
        `stable_prefix_for`, which looks only at settled text.

        Args:
            max_tokens: the token budget, zero or more.

        Returns:
            A prefix length in characters; the whole text's length if it fits.

        Raises:
            ValueError: ``max_tokens`` is negative.
        """
        return self._longest_prefix(max_tokens, self._length)

    def stable_prefix_for(self, max_tokens: int) -> int:
        """Like `prefix_for`, but only within the settled text (`stable_length`).

        The result never decreases as more text is fed and never exceeds what `prefix_for`
        returns at any later point, so text up to it can be released while the stream runs
        without ever releasing more than the final cut.

        Args:
            max_tokens: the token budget, zero or more.

        Returns:
            A prefix length in characters, at most `stable_length`.

        Raises:
            ValueError: ``max_tokens`` is negative.
        """
        return self._longest_prefix(max_tokens, self._frozen_at)

    def _note_uncertain(self, text: str, start: int) -> None:
        for index in range(len(text) - 1, -1, -1):
            if unicodedata.category(text[index]) in _UNCERTAIN_CATEGORIES:
                self._last_uncertain = start + index
                return

    def _stable_cut(self, tail: str) -> int:
        """Return the offset in ``tail`` up to which pieces are final (0: none)."""
        start = 0
        if self._last_uncertain >= self._frozen_at:
            start = _letter_end_after(tail, self._last_uncertain - self._frozen_at + 1)
            if start < 0:
                return 0
        starts = [match.start() for match in self._pieces.finditer(tail, start)]
        return starts[-self._depth] if len(starts) > self._depth else start

    def _slice(self, start: int, end: int) -> str:
        if start >= self._frozen_at:
            return self._tail[start - self._frozen_at : end - self._frozen_at]
        first = bisect_right(self._chunk_ends, start)
        last = bisect_left(self._chunk_ends, end)
        base = self._chunk_ends[first - 1] if first else 0
        return "".join(self._chunks[first : last + 1])[start - base : end - base]

    def _longest_prefix(self, max_tokens: int, limit: int) -> int:
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be zero or more, got {max_tokens}")
        if self.count_prefix(limit) <= max_tokens:
            return limit  # the text's end and the frozen boundary both end tokens
        # A prefix is counted from the last record seen before its end, so it can only fit if that
        # record's frozen count does: search back from the last record that fits.
        record = bisect_right(self._record_count, max_tokens) - 1
        high = limit
        if record + 1 < len(self._record_seen):
            high = min(high, self._record_seen[record + 1] - 1)
        while record >= 0:
            low = self._record_seen[record]
            if low <= high:
                found = self._longest_in_record(record, low, high, max_tokens)
                if found is not None:
                    return found
                high = low - 1
            record -= 1
        raise AssertionError("the empty prefix always fits")  # pragma: no cover

    def _longest_in_record(self, record: int, low: int, high: int, max_tokens: int) -> int | None:
        """Return the longest fitting prefix end in [low, high] counted from ``record`` (None: none fits)."""
        start = self._record_at[record]
        base = self._record_count[record]
        region, ends = self._token_ends(record, high)
        # Prefix counts are not monotonic, so every candidate is counted, in one pass by a nested counter.
        counter = TokenCounter(self._encoding)
        counter.feed(region[: max(low - start, 0)])
        best = None
        for end in ends:
            if start + end < low:
                continue
            counter.feed(region[counter._length : end])
            if base + counter.count <= max_tokens:
                best = start + end
            elif base + counter._frozen_count > max_tokens:
                break  # settled tokens alone exceed the budget: no longer prefix can fit
        return best

    def _token_ends(self, record: int, high: int) -> tuple[str, list[int]]:
        """Return the text from ``record``'s boundary and the whole text's token ends in it, up to ``high``.

        Ends are offsets into the returned text and lie on character boundaries.
        """
        start = self._record_at[record]
        if high <= start:
            return "", [0]
        later = bisect_left(self._record_at, high)
        if later < len(self._record_at):
            # Tokens up to a later frozen boundary, encoded with the text that boundary was frozen with.
            region = self._slice(start, self._record_seen[later])
            tokens = self._encode(region)[: self._record_count[later] - self._record_count[record]]
        else:
            region = self._slice(start, self._length)
            tokens = self._encode(region)
        ends = _char_offsets(self._encoding.decode_tokens_bytes(tokens), region)
        return region, [end for end in ends if start + end <= high]


def _letter_end_after(text: str, first_certain: int) -> int:
    """Return the first index past ``first_certain`` that surely ends a piece (-1: none yet).

    A letter followed by a character that is neither letter, mark nor apostrophe ends every
    letter alternative of the patterns above, whatever precedes it; from ``first_certain`` on,
    every character is classified the same by tiktoken and by Python.
    """
    for index in range(first_certain + 1, len(text)):
        char = text[index]
        if (
            text[index - 1].isalpha()
            and not char.isalpha()
            and char != "'"
            and not unicodedata.category(char).startswith("M")
        ):
            return index
    return -1


def _char_offsets(token_bytes: list[bytes], text: str) -> list[int]:
    """Return the offsets in ``text`` at which tokens end on a character boundary, starting with 0.

    ``token_bytes`` encode ``text`` or a prefix of it that ends on a character boundary, as
    tiktoken saw it: tiktoken re-pairs split surrogates and replaces lone ones, so its
    character offsets are mapped back to indices in ``text``.
    """
    positions = _seen_char_starts(text)
    offsets = [0]
    chars = 0
    for index, token in enumerate(token_bytes):
        chars += sum(1 for byte in token if byte & 0xC0 != 0x80)  # UTF-8 lead bytes start characters
        following = token_bytes[index + 1] if index + 1 < len(token_bytes) else None
        if following is None or following[0] & 0xC0 != 0x80:
            offsets.append(chars if positions is None else positions[chars])
    return offsets


def _seen_char_starts(text: str) -> list[int] | None:
    """Map tiktoken's character indices to indices in ``text`` when it contains surrogates (else None)."""
    if not _SURROGATE.search(text):
        return None
    starts = []
    index = 0
    while index < len(text):
        starts.append(index)
        paired = (
            0xD800 <= ord(text[index]) <= 0xDBFF and index + 1 < len(text) and 0xDC00 <= ord(text[index + 1]) <= 0xDFFF
        )
        index += 2 if paired else 1
    starts.append(len(text))
    return starts
