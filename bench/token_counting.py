"""Token counting cost per delta, from 1,000 to 20,000 deltas: flat for the guard, growing for the naive way.

Issue 3, acceptance 6. Three ways to know a stream's exact token count after every delta, on
the same realistic answer (English prose, code, Korean, emoji, digits) cut into deltas of about
one o200k_base token each:

* ``guard``: a ``StreamGuard`` whose only rule is a ``token_budget`` that never trips, fed one
  OpenAI chunk per delta (so SSE decoding, JSON parsing and re-rendering are in the figure).
  The rule counts exactly only once its byte bound (a token is at least one byte) says the
  budget could be near, so ``budget far`` (a budget far beyond the stream) measures that bound
  alone, and ``budget exact`` (a budget of exactly the stream's token count: it fits, so it
  never trips) measures the rule as it works near its budget: each time the bound reaches the
  budget the counter catches up on everything uncounted in one call (at about four bytes a
  token the gap to the budget shrinks by a quarter each time: some 50 calls over 20,000
  deltas), and the last 16 tokens are counted delta by delta with the near-budget hold-back.
  ``no rules`` is the same guard with no rule, for scale (figures that close, taken apart,
  are too noisy for their difference to mean much).
* ``counter``: ``TokenCounter.feed`` alone after every delta: the exact incremental count, the
  clean measure of what counting a delta costs.
* ``naive``: re-encode the whole accumulated text with tiktoken after every delta. Timed over the
  last ``NAIVE_SAMPLE`` deltas of each stream (the text before them is built untimed), which is
  what the late deltas of a stream of that length cost; a whole naive stream of 20,000 deltas
  would take a minute.

Each figure is the best of ``--repeats`` runs, in microseconds per delta; the lengths are
interleaved in every round so that load on the machine falls on all of them alike.

    python bench/token_counting.py [--deltas 1000 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from guardrail.core.engine import StreamGuard
from guardrail.core.rule import Action, BoundRule
from guardrail.core.tokens import TokenCounter
from guardrail.rules.budget import TokenBudget
from guardrail.tokenizers import get_encoding

ENCODING = "o200k_base"
FAR_BUDGET = 10**9
# Naive sampling at long lengths: this many consecutive deltas, ending this close to the stream's end.
NAIVE_SAMPLE = 200

PARAGRAPH = (
    "Streaming hides the model's latency: words appear while the rest is still being generated. "
    "Guarding a stream is harder than guarding a whole answer, because the full text is never in "
    "hand and whatever has been sent cannot be taken back. Here is a function:\n\n"
    "```python\ndef total(prices: list[float], tax: float = 0.2) -> float:\n"
    "    return round(sum(prices) * (1 + tax), 2)\n```\n\n"
    "It handles 1,234,567 items; it doesn't allocate, and it's O(n). "
    "한국어 문장도 섞여 있습니다. Emoji 🎉 and 👩\u200d👩\u200d👧 take several tokens each!\n\n"
)


def token_deltas(count: int) -> list[str]:
    """``count`` deltas of about one token each, cycling through ``PARAGRAPH``'s tokens."""
    encoding = get_encoding(ENCODING)
    cycle: list[str] = []
    pending = b""
    for token in encoding.decode_tokens_bytes(encoding.encode_ordinary(PARAGRAPH)):
        pending += token
        try:
            cycle.append(pending.decode("utf-8"))  # a token that ends inside a character joins the next
        except UnicodeDecodeError:
            continue
        pending = b""
    return [cycle[number % len(cycle)] for number in range(count)]


def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    obj = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def stream_bytes(deltas: Sequence[str]) -> list[bytes]:
    body = [chunk({"role": "assistant", "content": ""})]
    body += [chunk({"content": delta}) for delta in deltas]
    return [*body, chunk({}, "stop"), b"data: [DONE]\n\n"]


def time_guard(body: Sequence[bytes], deltas: int, *, max_tokens: int | None) -> float:
    """Seconds for one stream through a fresh guard (with a budget of ``max_tokens``, or no rules if None)."""
    encoding = get_encoding(ENCODING)
    budget = TokenBudget(encoding, max_tokens=max_tokens) if max_tokens is not None else None
    rules = [BoundRule("budget", budget, Action.ABORT)] if budget is not None else []
    guard = StreamGuard(rules, encoding=encoding)
    start = time.perf_counter()
    for data in body:
        guard.feed(data)
    guard.close()
    elapsed = time.perf_counter() - start
    assert guard.deltas == deltas, "the budget tripped or deltas were lost"
    return elapsed


def time_counter(deltas: Sequence[str]) -> float:
    """Seconds for one stream through a fresh `TokenCounter`."""
    counter = TokenCounter(get_encoding(ENCODING))
    start = time.perf_counter()
    for delta in deltas:
        counter.feed(delta)
    return time.perf_counter() - start


def time_naive(deltas: Sequence[str]) -> tuple[float, int]:
    """Seconds for re-encoding everything so far after each of the last ``NAIVE_SAMPLE`` deltas, and how many."""
    encode = get_encoding(ENCODING).encode_ordinary
    first = max(len(deltas) - NAIVE_SAMPLE, 0)
    text = "".join(deltas[:first])  # built untimed
    start = time.perf_counter()
    for delta in deltas[first:]:
        text += delta
        encode(text)
    return time.perf_counter() - start, len(deltas) - first


@dataclass(frozen=True, slots=True)
class Row:
    deltas: int
    no_rules: float  # µs per delta, StreamGuard without rules
    budget_far: float  # µs per delta, StreamGuard with a budget far beyond the stream
    budget_exact: float  # µs per delta, StreamGuard with a budget of exactly the stream's tokens
    counter: float  # µs per delta, TokenCounter.feed alone
    naive: float  # µs per delta, re-encoding everything, near the end of the stream


def measure(lengths: Sequence[int], repeats: int) -> list[Row]:
    """Best of ``repeats`` for every length, the lengths interleaved so that load on the machine hits all alike."""
    streams = {deltas: (token_deltas(deltas), stream_bytes(token_deltas(deltas))) for deltas in lengths}
    encode = get_encoding(ENCODING).encode_ordinary
    exact = {deltas: len(encode("".join(texts))) for deltas, (texts, _) in streams.items()}
    best: dict[tuple[int, str], float] = {}

    def keep(deltas: int, what: str, seconds: float, count: int) -> None:
        best[deltas, what] = min(best.get((deltas, what), float("inf")), seconds / count * 1e6)

    texts, body = streams[lengths[0]]
    time_guard(body, len(texts), max_tokens=exact[lengths[0]])  # warm up: caches, the regex, the allocator
    for _ in range(repeats):
        for deltas, (texts, body) in streams.items():
            keep(deltas, "no_rules", time_guard(body, deltas, max_tokens=None), deltas)
            keep(deltas, "budget_far", time_guard(body, deltas, max_tokens=FAR_BUDGET), deltas)
            keep(deltas, "budget_exact", time_guard(body, deltas, max_tokens=exact[deltas]), deltas)
            keep(deltas, "counter", time_counter(texts), deltas)
            keep(deltas, "naive", *time_naive(texts))
    return [
        Row(deltas, *(best[deltas, what] for what in ("no_rules", "budget_far", "budget_exact", "counter", "naive")))
        for deltas in lengths
    ]


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--deltas", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    get_encoding(ENCODING)  # load it outside the timings
    rows = measure(args.deltas, args.repeats)
    print(f"µs per delta, best of {args.repeats}; deltas of about one {ENCODING} token of realistic text")
    header = ("deltas", "guard, no rules", "budget far", "budget exact", "TokenCounter", "naive re-encode")
    print("".join(f"{title:>17}" for title in header))
    for row in rows:
        cells = (row.no_rules, row.budget_far, row.budget_exact, row.counter, row.naive)
        print(f"{row.deltas:>17,}" + "".join(f"{cell:>17.2f}" for cell in cells))
    first, last = rows[0], rows[-1]
    ratios = {
        "budget far": last.budget_far / first.budget_far,
        "budget exact": last.budget_exact / first.budget_exact,
        "counter": last.counter / first.counter,
        "naive": last.naive / first.naive,
    }
    print(f"ratio {last.deltas:,} / {first.deltas:,} deltas: " + ", ".join(f"{k} {v:.2f}×" for k, v in ratios.items()))
    slower = last.naive / last.budget_exact
    print(f"naive near the end of {last.deltas:,} deltas (last {NAIVE_SAMPLE}): {slower:.0f}× the guard, budget exact")
    return {"rows": rows, "ratios": ratios}


if __name__ == "__main__":
    main()
