"""The naive way to guard a stream, on the same streams as the real guard: the curve it avoids.

After every delta the naive guard appends the delta's text to the whole answer so far, searches
all of it again with every pattern and phrase of the rule file (each compiled on its own with the
``regex`` module, ``search(text, partial=True)``: the same job as the real guard's scan, hold-back
included), and re-encodes all of it with the o200k_base tokenizer to count tokens.

Its per-delta cost grows with the answer, so whole streams of 10,000 and 50,000 deltas would take
minutes. Up to ``FULL_RUN_MAX`` deltas, every delta of the stream is timed. Beyond that, the cost
is sampled: at ``SAMPLES`` positions spread evenly over the stream, the guard is given the text
accumulated so far (untimed) and ``RUN`` consecutive deltas are timed; the median of each run,
averaged over the positions, estimates the mean per-delta cost over the whole stream. ``last``
is the same measure for the final deltas of the stream.

The tokenizer comes from ``guardrail.tokenizers`` if present, else from tiktoken only if its
o200k_base file is already in tiktoken's cache (these machines are offline). Without either,
only the regex part runs, and the output says so.

    python bench/naive.py [--rules rules/default.yaml] [--deltas 100 1000 10000 50000]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex
import yaml
from common import (
    CHAT_PATH,
    DEFAULT_RULES,
    STREAM_LENGTHS,
    bench_rules,
    cpu_clock,
    md_table,
    openai_stream,
    prose_deltas,
    step,
    stream_text,
)

from guardrail.rules.banned import phrase_pattern

FULL_RUN_MAX = 1_000  # streams up to this many deltas are timed delta by delta, whole
SAMPLES = 12  # positions sampled in a longer stream
RUN = 3  # consecutive deltas timed at each position

Encode = Callable[[str], Sequence[int]]

_O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


def load_encoder() -> tuple[Encode | None, str]:
    """The o200k_base ``encode`` function and where it came from; None and the reason if unavailable."""
    try:
        tokenizers = importlib.import_module("guardrail.tokenizers")
    except ImportError:
        pass
    else:
        try:
            encoding = tokenizers.get_encoding("o200k_base")
        except Exception as exc:
            return None, f"guardrail.tokenizers failed to load o200k_base: {type(exc).__name__}: {exc}"
        return _encode_of(encoding), "o200k_base from guardrail.tokenizers"
    cached = _tiktoken_cache_path()
    if cached is None or not cached.exists():
        return None, "no tokenizer: guardrail.tokenizers does not exist yet and tiktoken cannot load o200k_base offline"
    import tiktoken

    return _encode_of(tiktoken.get_encoding("o200k_base")), "o200k_base from tiktoken's cache"


def _encode_of(encoding: Any) -> Encode:
    """``encode_ordinary`` (special tokens as plain text), else ``encode``."""
    encode: Encode = encoding.encode_ordinary if hasattr(encoding, "encode_ordinary") else encoding.encode
    return encode


def _tiktoken_cache_path() -> Path | None:
    """Where tiktoken caches o200k_base (its own rule), so that it is never fetched from the network here."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return None
    return Path(cache_dir) / hashlib.sha1(_O200K_URL.encode()).hexdigest()


def rule_file_patterns(path: str | Path) -> list[regex.Pattern[str]]:
    """Every pattern and phrase of the ``banned_patterns`` rules of a rule file, each compiled alone."""
    document = yaml.safe_load(Path(path).read_text())
    sources: list[str] = []
    for rule in document.get("rules", []):
        if rule.get("type") == "banned_patterns":
            sources += rule.get("patterns", [])
            sources += [phrase_pattern(phrase) for phrase in rule.get("phrases", [])]
    return [regex.compile(source) for source in sources]


class NaiveGuard:
    """Rescans and re-encodes the whole answer after every delta. Times its two parts separately."""

    def __init__(self, patterns: Sequence[regex.Pattern[str]], encode: Encode | None) -> None:
        self.patterns = patterns
        self.encode = encode
        self.text = ""
        self.scan_seconds = 0.0
        self.encode_seconds = 0.0
        self.hold_from = 0  # where the earliest match or partial match starts: the release frontier
        self.tokens = 0

    def feed(self, chunk: bytes) -> None:
        self.text += stream_text(chunk)
        start = cpu_clock()
        frontier = len(self.text)
        for pattern in self.patterns:
            match = pattern.search(self.text, partial=True)
            if match is not None:
                frontier = min(frontier, match.start())
        self.hold_from = frontier
        middle = cpu_clock()
        if self.encode is not None:
            self.tokens = len(self.encode(self.text))
        self.scan_seconds += middle - start
        self.encode_seconds += cpu_clock() - middle


@dataclass(frozen=True, slots=True)
class NaiveCost:
    """µs per delta of the naive guard for one stream length."""

    deltas: int
    chars: int  # length of the whole answer
    mean: float  # estimated mean over the stream
    scan: float  # of which the regex rescans
    encode: float  # of which the re-encoding
    last: float  # at the end of the stream
    sampled: bool


def _timed(guard: NaiveGuard, chunks: Sequence[bytes]) -> list[tuple[float, float, float]]:
    """(total, scan, encode) seconds of each chunk fed to ``guard``."""
    times = []
    for chunk in chunks:
        scan, encode = guard.scan_seconds, guard.encode_seconds
        start = cpu_clock()
        guard.feed(chunk)
        times.append((cpu_clock() - start, guard.scan_seconds - scan, guard.encode_seconds - encode))
    return times


def _at(
    patterns: Sequence[regex.Pattern[str]],
    encode: Encode | None,
    deltas: Sequence[str],
    chunks: Sequence[bytes],
    at: int,
) -> tuple[float, float, float]:
    """Median (total, scan, encode) seconds of ``RUN`` deltas fed after the first ``at`` deltas."""
    guard = NaiveGuard(patterns, encode)
    guard.text = "".join(deltas[:at])
    times = _timed(guard, chunks[at + 1 : at + 1 + RUN])  # chunks[0] is the role chunk
    return (
        statistics.median(t for t, _, _ in times),
        statistics.median(s for _, s, _ in times),
        statistics.median(e for _, _, e in times),
    )


def measure(patterns: Sequence[regex.Pattern[str]], encode: Encode | None, deltas: int) -> NaiveCost:
    texts = prose_deltas(deltas)
    chunks = openai_stream(texts)
    chars = sum(map(len, texts))
    if deltas <= FULL_RUN_MAX:
        times = _timed(NaiveGuard(patterns, encode), chunks[1 : deltas + 1])
        tail = times[-min(len(times), 10) :]
        return NaiveCost(
            deltas,
            chars,
            mean=statistics.fmean(t for t, _, _ in times) * 1e6,
            scan=statistics.fmean(s for _, s, _ in times) * 1e6,
            encode=statistics.fmean(e for _, _, e in times) * 1e6,
            last=statistics.median(t for t, _, _ in tail) * 1e6,
            sampled=False,
        )
    positions = [int(deltas * (k + 0.5) / SAMPLES) for k in range(SAMPLES)]
    samples = [_at(patterns, encode, texts, chunks, min(at, deltas - RUN)) for at in positions]
    last = _at(patterns, encode, texts, chunks, deltas - RUN)
    return NaiveCost(
        deltas,
        chars,
        mean=statistics.fmean(t for t, _, _ in samples) * 1e6,
        scan=statistics.fmean(s for _, s, _ in samples) * 1e6,
        encode=statistics.fmean(e for _, _, e in samples) * 1e6,
        last=last[0] * 1e6,
        sampled=True,
    )


@dataclass(frozen=True, slots=True)
class NaiveResults:
    costs: list[NaiveCost]
    tokenizer: str  # where the tokenizer came from, or why there is none
    has_tokenizer: bool
    patterns: int


def table(results: NaiveResults, engine: dict[int, float] | None = None) -> str:
    """The naive guard's cost per length; with ``engine`` (µs/delta by length), the slowdown too."""
    headers = ["deltas", "answer chars", "naive µs/delta (mean)", "regex rescans", "re-encoding", "naive, last delta"]
    if engine:
        headers += ["real engine µs/delta", "naive / engine"]
    rows = []
    for cost in results.costs:
        row = [
            f"{cost.deltas:,}" + (" (sampled)" if cost.sampled else ""),
            f"{cost.chars:,}",
            f"{cost.mean:,.0f}",
            f"{cost.scan:,.0f}",
            f"{cost.encode:,.0f}" if results.has_tokenizer else "skipped",
            f"{cost.last:,.0f}",
        ]
        if engine:
            real = engine.get(cost.deltas)
            row += [f"{real:.1f}", f"{cost.mean / real:,.1f}×"] if real else ["", ""]
        rows.append(row)
    return md_table(headers, rows)


def main(argv: Sequence[str] | None = None, *, engine: dict[int, float] | None = None) -> NaiveResults:
    """Measure the naive guard; compare with ``engine`` if given, else with one run of the real engine."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rules", default=str(DEFAULT_RULES))
    parser.add_argument("--deltas", type=int, nargs="+", default=list(STREAM_LENGTHS))
    parser.add_argument("--no-compare", action="store_true", help="don't time the real engine for comparison")
    args = parser.parse_args(argv)
    patterns = rule_file_patterns(args.rules)
    encode, source = load_encoder()
    step(f"naive guard: {len(patterns)} regexes; tokenizer: {source}")
    costs = []
    for deltas in args.deltas:
        step(f"naive guard: {deltas:,} deltas")
        costs.append(measure(patterns, encode, deltas))
    results = NaiveResults(costs, source, encode is not None, len(patterns))
    if engine is None and not args.no_compare:
        from per_delta import engine_stream

        from guardrail import load_rules

        bound = load_rules(str(bench_rules())).rules_for(CHAT_PATH)
        engine = {}
        for deltas in args.deltas:
            step(f"real engine, for comparison: {deltas:,} deltas")
            whole, _, _ = engine_stream(bound, openai_stream(prose_deltas(deltas)))
            engine[deltas] = whole / deltas * 1e6
    print(table(results, engine))
    if encode is None:
        print(f"note: {source}; the naive figures are the regex rescans alone")
    return results


if __name__ == "__main__":
    main()
