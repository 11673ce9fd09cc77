"""Phrase lists at scale: load time and per-delta cost of 10,000 phrases against one.

Phrases are two words drawn from a 3,000-word vocabulary. Two texts are streamed through the
engine, one word per delta (as models send) and in 4-character deltas (the worst case: nearly
every delta ends inside a word that may begin a phrase, so it is held): ordinary English prose,
and prose made of the phrases' own words in
an order that never forms a phrase (the case that used to trip the regex timeout). Reports the
median of several rounds, the two rule sets' rounds interleaved, with the spread.

    python bench/phrases.py [--phrases 10000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import time

from guardrail.core.engine import StreamGuard
from guardrail.core.rule import Action, BoundRule
from guardrail.rules.banned import BannedPatterns

PROSE = (
    "The quick brown fox jumps over the lazy dog while the committee reviews the quarterly "
    "report and the weather stays mild for most of the week across the northern region. "
) * 20


def vocabulary(size: int = 3000) -> list[str]:
    return [f"{chr(97 + n % 26)}{chr(97 + n // 26 % 26)}{chr(97 + n // 676 % 26)}word{n}" for n in range(size)]


def phrase_list(words: list[str], count: int) -> list[str]:
    """``count`` distinct two-word phrases of ``words``: each round of first words gets new second words."""
    size = len(words)
    phrases = [f"{words[n % size]} {words[(n * 7 + 3 * (n // size) + 1) % size]}" for n in range(count)]
    assert len(set(phrases)) == count
    return phrases


def own_order(words: list[str], phrases: list[str], count: int) -> list[str]:
    """``count`` of the phrases' words in an order in which no two neighbours form a phrase."""
    pairs = set(phrases)
    out = [words[0]]
    step = 13
    while len(out) < count:
        word = words[(len(out) * step) % len(words)]
        if f"{out[-1]} {word}" in pairs:
            word = words[(len(out) * step + 1) % len(words)]
        out.append(word)
    return out


def deltas(text: str, size: int = 4) -> list[bytes]:
    """``text`` in deltas of ``size`` characters (0: one word, with its leading space, per delta, as models send)."""
    pieces = re.findall(r"\s*\S+", text) if size == 0 else [text[i : i + size] for i in range(0, len(text), size)]
    return [
        b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": piece}}]}).encode() + b"\n\n"
        for piece in pieces
    ]


def per_delta_us(rules: list[BannedPatterns], events: list[bytes], rounds: int = 9) -> list[tuple[float, float, float]]:
    """Each rule's µs per delta (min, median, max over ``rounds``), the rules' rounds interleaved."""
    samples: list[list[float]] = [[] for _ in rules]
    for _ in range(rounds):
        for rule, times in zip(rules, samples, strict=True):
            guard = StreamGuard([BoundRule("phrases", rule, Action.REDACT)])
            started = time.perf_counter()
            for event in events:
                guard.feed(event)
            times.append((time.perf_counter() - started) / len(events) * 1e6)
    return [(min(times), statistics.median(times), max(times)) for times in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phrases", type=int, default=10_000)
    args = parser.parse_args()
    words = vocabulary()
    phrases = phrase_list(words, args.phrases)
    loads = []
    for _ in range(3):
        started = time.perf_counter()
        many = BannedPatterns(phrases=phrases)
        loads.append(time.perf_counter() - started)
    one = BannedPatterns(phrases=["project starlight"])
    own_words = " ".join(own_order(words, phrases, 600))
    print(
        f"{args.phrases} phrases load in {statistics.median(loads):.2f} s "
        f"(median of 3; {min(loads):.2f}-{max(loads):.2f})"
    )
    for (name, text), size in itertools.product(
        (("English prose", PROSE), ("the phrases' own words", own_words)), (0, 4)
    ):
        events = deltas(text, size)
        name = f"{name}, {'word' if size == 0 else f'{size}-character'} deltas"
        single, scaled = per_delta_us([one, many], events)
        print(
            f"{name}: one phrase {single[1]:.1f} µs/delta ({single[0]:.1f}-{single[2]:.1f}), "
            f"{args.phrases} phrases {scaled[1]:.1f} µs/delta ({scaled[0]:.1f}-{scaled[2]:.1f}): "
            f"{scaled[1] / single[1]:.2f}×"
        )


if __name__ == "__main__":
    main()
