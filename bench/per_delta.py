"""Per-delta cost of the guard at growing stream lengths: the engine alone, and through the middleware.

Engine: ``StreamGuard`` with the rules of the rule file, fed one OpenAI chunk per call (the way
a model server sends them), ``now`` advancing at model pace. Middleware: ``GuardrailMiddleware``
driven by a raw ASGI harness (no server, no sockets), so the figure is the guard's own cost (SSE
decoding, JSON parsing, every rule, re-rendering, ASGI plumbing, metrics) plus the harness, whose
own cost is the ``bare app`` column. All in CPU time, so that other work on the machine does not
count as the guard's.

The table: for each length, the best of ``--repeats`` runs of one whole stream (the same number
of runs at every length, so that no length gets more chances at a quiet moment), divided by its
deltas; the lengths are measured in interleaved rounds. ``last 1,000`` times only a stream's
last thousand deltas; ``stream's end`` its finish chunk, ``[DONE]`` and ``close()``. The guard's
memory after the last delta is measured in a separate run, under tracemalloc.

The flatness ratio is measured paired, because on a shared machine the CPU's speed drifts by
more than the 1.3× it tests: the longest stream runs in windows of 1,000 deltas, and after each
window a fresh stream of the shortest length runs whole, so both see the same conditions. The
ratio is the mean cost per delta of the long stream over that of the short ones.

    python bench/per_delta.py [--rules FILE] [--deltas 1000 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common import (
    CHAT_PATH,
    MODEL_PACE,
    bench_rules,
    cpu_clock,
    md_table,
    openai_stream,
    prose_deltas,
    rules_note,
    run_once,
    step,
    streaming_app,
)

from guardrail import GuardrailMiddleware, StreamGuard, load_rules
from guardrail._types import Receive, Scope, Send
from guardrail.core.rule import BoundRule

TAIL = 1_000  # deltas in the "last 1,000" window


@dataclass(frozen=True, slots=True)
class PerDelta:
    """µs per delta for one stream length."""

    deltas: int
    engine: float  # StreamGuard alone, whole stream
    engine_tail: float  # StreamGuard alone, the last TAIL deltas of the stream
    ending_ms: float  # StreamGuard alone: the finish chunk, [DONE] and close()
    memory_kib: float  # what the StreamGuard holds after the last delta (tracemalloc, a separate run)
    bare: float  # the harness and app without the guard
    middleware: float  # the same through GuardrailMiddleware

    @property
    def guard_cost(self) -> float:
        return self.middleware - self.bare


@dataclass(frozen=True, slots=True)
class Paired:
    """Mean µs per delta of one long stream and of short streams run between its windows."""

    long: int
    short: int
    engine_long: float
    engine_short: float
    middleware_long: float
    middleware_short: float

    @property
    def engine_ratio(self) -> float:
        return self.engine_long / self.engine_short

    @property
    def middleware_ratio(self) -> float:
        return self.middleware_long / self.middleware_short


def engine_stream(rules: Sequence[BoundRule], chunks: Sequence[bytes]) -> tuple[float, float, float]:
    """CPU seconds through one fresh StreamGuard: the whole stream, its last ``TAIL`` deltas, its ending.

    ``chunks`` is a role chunk, the deltas, a finish chunk and ``[DONE]``; the ending is the last
    two and ``close()``.
    """
    guard = StreamGuard(rules, start=0.0)
    feed = guard.feed
    ending = len(chunks) - 2
    mark = max(1, ending - TAIL)
    tail_start = tail_end = start = cpu_clock()
    for index, chunk in enumerate(chunks):
        if index == mark:
            tail_start = cpu_clock()
        elif index == ending:
            tail_end = cpu_clock()
        feed(chunk, index / MODEL_PACE)
    guard.close(len(chunks) / MODEL_PACE)
    end = cpu_clock()
    if guard.deltas < len(chunks) - 3:  # role chunk, finish chunk and [DONE] carry no delta
        raise RuntimeError(
            f"a rule ended the stream after {guard.deltas:,} of {len(chunks) - 3:,} deltas: the per-delta cost "
            "would not be comparable (raise the rule file's max_tokens, as bench_rules() does)"
        )
    return end - start, tail_end - tail_start, end - tail_end


def guard_memory(rules: Sequence[BoundRule], chunks: Sequence[bytes]) -> int:
    """Bytes a fresh StreamGuard holds after every chunk but the ending (tracemalloc: slow, so apart)."""
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        guard = StreamGuard(rules, start=0.0)
        for index, chunk in enumerate(chunks[:-2]):
            guard.feed(chunk, index / MODEL_PACE)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()


def measure(rules: str | Path, lengths: Sequence[int], repeats: int = 3) -> list[PerDelta]:
    """Best-of-``repeats`` µs per delta for one stream of each of ``lengths`` ordinary deltas.

    The lengths are measured in interleaved rounds (every length once, then again), so that a
    change in the machine's load during the run affects every length alike.
    """
    bound = load_rules(str(rules)).rules_for(CHAT_PATH)
    chunks = {deltas: openai_stream(prose_deltas(deltas)) for deltas in lengths}
    apps = {deltas: streaming_app(chunks[deltas]) for deltas in lengths}
    guarded = {deltas: GuardrailMiddleware(apps[deltas], rules=str(rules)) for deltas in lengths}
    times: dict[int, list[tuple[float, float, float, float, float]]] = {deltas: [] for deltas in lengths}
    for number in range(repeats):
        step(f"per-delta cost: round {number + 1} of {repeats}")
        for deltas in lengths:
            whole, last, ending = engine_stream(bound, chunks[deltas])
            bare = asyncio.run(run_once(apps[deltas]))
            through = asyncio.run(run_once(guarded[deltas]))
            times[deltas].append((whole, last, ending, bare, through))
    step("per-delta cost: the guard's memory after the last delta")
    memory = {deltas: guard_memory(bound, chunks[deltas]) for deltas in lengths}
    return [
        PerDelta(
            deltas=deltas,
            engine=min(t[0] for t in times[deltas]) / deltas * 1e6,
            engine_tail=min(t[1] for t in times[deltas]) / min(deltas, TAIL) * 1e6,
            ending_ms=min(t[2] for t in times[deltas]) * 1e3,
            memory_kib=memory[deltas] / 1024,
            bare=min(t[3] for t in times[deltas]) / deltas * 1e6,
            middleware=min(t[4] for t in times[deltas]) / deltas * 1e6,
        )
        for deltas in lengths
    ]


def measure_paired(rules: str | Path, long: int, short: int) -> Paired:
    """The long stream in windows of ``short`` deltas, a fresh short stream after each (see the module docstring)."""
    bound = load_rules(str(rules)).rules_for(CHAT_PATH)
    long_chunks = openai_stream(prose_deltas(long))
    short_chunks = openai_stream(prose_deltas(short))
    windows = 0

    step(f"per-delta cost, paired: the engine, {long:,} deltas against {short:,}")
    guard = StreamGuard(bound, start=0.0)
    engine_long = engine_short = 0.0
    for first in range(0, len(long_chunks), short):
        begin = cpu_clock()
        for index in range(first, min(first + short, len(long_chunks))):
            guard.feed(long_chunks[index], index / MODEL_PACE)
        engine_long += cpu_clock() - begin
        engine_short += engine_stream(bound, short_chunks)[0]
        windows += 1
    begin = cpu_clock()
    guard.close(len(long_chunks) / MODEL_PACE)
    engine_long += cpu_clock() - begin

    step(f"per-delta cost, paired: the middleware, {long:,} deltas against {short:,}")
    short_guarded = GuardrailMiddleware(streaming_app(short_chunks), rules=str(rules))
    nested = 0.0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal nested
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for index, chunk in enumerate(long_chunks):
            if index and index % short == 0:
                nested += await run_once(short_guarded)  # timed apart, and taken out of the long stream's time
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        nested += await run_once(short_guarded)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    total = asyncio.run(run_once(GuardrailMiddleware(app, rules=str(rules))))
    return Paired(
        long,
        short,
        engine_long=engine_long / long * 1e6,
        engine_short=engine_short / (short * windows) * 1e6,
        middleware_long=(total - nested) / long * 1e6,
        middleware_short=nested / (short * windows) * 1e6,
    )


def paired_lines(paired: Paired) -> str:
    return "\n".join(
        f"- {label}, paired: {paired.long:,}-delta stream {long_cost:.1f} µs/delta, {paired.short:,}-delta streams "
        f"{short_cost:.1f} µs/delta: **{long_cost / short_cost:.2f}×**"
        for label, long_cost, short_cost in (
            ("engine", paired.engine_long, paired.engine_short),
            ("middleware", paired.middleware_long, paired.middleware_short),
        )
    )


def table(results: Sequence[PerDelta]) -> str:
    rows = [
        (
            f"{r.deltas:,}",
            f"{r.engine:.1f}",
            f"{r.engine_tail:.1f}",
            f"{r.ending_ms:.2f}",
            f"{r.memory_kib:,.1f}",
            f"{r.bare:.1f}",
            f"{r.middleware:.1f}",
            f"{r.guard_cost:.1f}",
        )
        for r in results
    ]
    headers = (
        "deltas",
        "engine µs/delta",
        f"engine, last {TAIL:,} µs/delta",
        "engine, stream's end ms",
        "guard memory at the end KiB",
        "bare app µs/delta",
        "middleware µs/delta",
        "guard cost in middleware µs/delta",
    )
    return md_table(headers, rows)


def ratio(results: Sequence[PerDelta], attribute: str, long: int = 50_000, short: int = 1_000) -> float | None:
    """Per-delta cost at ``long`` deltas over the cost at ``short`` (None if either was not measured)."""
    by_length = {r.deltas: r for r in results}
    if long not in by_length or short not in by_length:
        return None
    return float(getattr(by_length[long], attribute)) / float(getattr(by_length[short], attribute))


@dataclass(frozen=True, slots=True)
class PerDeltaResults:
    lengths: list[PerDelta]
    paired: Paired | None  # None when only one length was asked for


def main(argv: Sequence[str] | None = None) -> PerDeltaResults:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rules", default=None, help="a rule file (default: default.yaml, budget raised)")
    parser.add_argument("--deltas", type=int, nargs="+", default=[1_000, 20_000])
    parser.add_argument("--repeats", type=int, default=3, help="runs per length")
    parser.add_argument("--paired-short", type=int, default=1_000, help="the short length of the paired ratio")
    args = parser.parse_args(argv)
    args.rules = args.rules or str(bench_rules())
    results = measure(args.rules, args.deltas, args.repeats)
    longest = max(args.deltas)
    paired = measure_paired(args.rules, longest, args.paired_short) if longest > args.paired_short else None
    print(rules_note() if args.rules == str(bench_rules()) else f"rules: {args.rules}")
    print(table(results))
    shortest = min(args.deltas)
    for attribute in ("engine", "middleware"):
        value = ratio(results, attribute, longest, shortest)
        if value is not None and longest != shortest:
            print(f"- {attribute}, best runs: µs/delta at {longest:,} deltas / at {shortest:,} deltas = {value:.2f}×")
    if paired is not None:
        print(paired_lines(paired))
    return PerDeltaResults(results, paired)


if __name__ == "__main__":
    main()
