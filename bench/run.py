"""``make bench``: every benchmark in one run, then the goals, met or not, and ``bench/RESULTS.md``.

Runs, in order: per-delta cost at growing lengths (engine and middleware), the naive guard on
the same streams, end to end over loopback, 1,000 concurrent streams at model pace, hold-back,
a profile of the hot path, the floor; then the floor and the concurrency run again in the
compiled build (``make compiled``), in a subprocess (``bench/compiled.py``). Each is also a
script of its own (``python bench/<name>.py``); this one composes their ``main()`` results. It
asserts nothing: benchmarks are not tests.

    python bench/run.py [--output bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import concurrency
import e2e
import floor
import holdback
import metrics_overhead
import naive
import per_delta
import profile_hot_path
from common import MODEL_PACE, ROOT, STREAM_LENGTHS, bench_rules, machine_info, md_table, rules_note, step

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
COMPILED = ROOT / "build" / "compiled"  # the compiled build, as `make compiled` leaves it


@dataclass(frozen=True, slots=True)
class Goal:
    goal: str
    measured: str
    met: bool | None  # None: reported for context, not a goal of the issue

    @property
    def verdict(self) -> str:
        return "info" if self.met is None else ("**met**" if self.met else "**not met**")


@dataclass(frozen=True, slots=True)
class Everything:
    per_delta: per_delta.PerDeltaResults
    naive: naive.NaiveResults
    e2e: e2e.EndToEnd
    concurrency: concurrency.Concurrency
    holdback: holdback.HoldbackResults
    profile: profile_hot_path.Profile
    metrics: dict[str, float]
    floor: floor.Results
    compiled: Compiled | None


@dataclass(frozen=True, slots=True)
class Compiled:
    """What bench/compiled.py measured in the compiled build: its tables and figures."""

    output: str
    floor: floor.Results
    added_p99_ms: dict[int, float]  # streams: the guard's added p99 lateness, deltas not held back
    memory_bare: float  # bytes per open stream
    memory_guarded: float


def run_compiled() -> Compiled | None:
    """bench/compiled.py in a subprocess that imports the compiled build; None if it is not built."""
    if not (COMPILED / ".built").exists():
        step(f"no compiled build in {COMPILED} (make compiled): its figures are left out")
        return None
    script = Path(__file__).resolve().parent / "compiled.py"
    env = {**os.environ, "PYTHONPATH": str(COMPILED)}
    done = subprocess.run([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True, check=True)
    *tables, last = done.stdout.rstrip().splitlines()
    figures = json.loads(last)
    if figures["build"] != "compiled":
        raise SystemExit(f"{COMPILED} did not import as the compiled build")
    found = figures["concurrency"]
    return Compiled(
        "\n".join(tables),
        {name: (engine, asgi) for name, (engine, asgi) in figures["floor"].items()},
        {int(streams): ms for streams, ms in found["added_p99_ms"].items()},
        found["memory_bare"],
        found["memory_guarded"],
    )


def build_goals(results: Everything) -> list[Goal]:
    """Issue 18's goals: the floor ratio, streams per process, memory; the compiled build is the one held to them."""
    found: list[Goal] = []
    builds: list[tuple[str, floor.Results, dict[int, float], float, bool | None]] = []
    c = results.concurrency
    source_added = {rounds.median[1].streams: concurrency.added_lateness(*rounds.median) * 1e3 for rounds in c.fewer}
    source_added[c.streams] = concurrency.added_lateness(c.bare, c.guarded) * 1e3
    compiled = results.compiled
    if compiled is not None:
        builds.append(("compiled build", compiled.floor, compiled.added_p99_ms, compiled.memory_guarded, True))
    builds.append(("source build", results.floor, source_added, c.memory_guarded, None if compiled else True))
    for label, floor_results, added, memory, held in builds:
        engine, asgi = floor.ratios(floor_results)
        found.append(
            Goal(f"(g) guardrail ÷ floor ≤ 2.0, engine alone, {label}", f"{engine:.2f}×", _met(engine <= 2.0, held))
        )
        found.append(
            Goal(f"(g) guardrail ÷ floor ≤ 2.0, through ASGI, {label}", f"{asgi:.2f}×", _met(asgi <= 2.0, held))
        )
        at_600 = added.get(600)
        found.append(
            Goal(
                f"(g) 600 streams at {MODEL_PACE:g} deltas/s: p99 added lateness < 10 ms, deltas not held, {label}",
                "not measured" if at_600 is None else f"{at_600:.2f} ms",
                None if at_600 is None else _met(at_600 < 10, held),
            )
        )
        kib = memory / 1024
        found.append(
            Goal(f"(g) memory per open guarded stream ≤ 12 KiB, {label}", f"{kib:.1f} KiB", _met(kib <= 12, held))
        )
    return found


def _met(met: bool, held: bool | None) -> bool | None:
    """The verdict of a goal the build is held to; None (reported for context) otherwise."""
    return met if held else None


def goals(results: Everything) -> list[Goal]:
    found: list[Goal] = []
    ratio = results.e2e.ratio
    found.append(Goal("(c) guarded throughput end to end ≥ 0.6× unguarded", f"{ratio:.2f}×", ratio >= 0.6))
    found.extend(build_goals(results))
    paired = results.per_delta.paired
    for attribute, label in (("engine", "engine"), ("middleware", "through the middleware")):
        value = getattr(paired, f"{attribute}_ratio") if paired is not None else None
        best = per_delta.ratio(results.per_delta.lengths, attribute)
        found.append(
            Goal(
                f"(a) per-delta cost at 50,000 deltas ≤ 1.3× that at 1,000, {label} (paired)",
                "not measured" if value is None else f"{value:.2f}×",
                None if value is None else value <= 1.3,
            )
        )
        if best is not None:
            found.append(Goal(f"(a) the same from the table's best runs, {label}", f"{best:.2f}×", None))
    c = results.concurrency
    p99 = c.added(0.99)
    found.append(
        Goal(
            f"(d) p99 added latency < 2 ms at {c.streams:,} concurrent streams (every delta, send to send)",
            f"{p99 * 1e3:.2f} ms",
            p99 < 0.002,
        )
    )
    found.append(
        Goal(
            "(d) the same, deltas not held back (the guard's processing alone)",
            f"{c.added(0.99, 'latency_unheld') * 1e3:.2f} ms",
            None,
        )
    )
    found.append(
        Goal(
            "(d) the same, from when each delta was due (includes waiting for a saturated event loop)",
            f"{c.added(0.99, 'lateness') * 1e3:.1f} ms (guarded CPU {c.guarded.busy:.0%} of wall)",
            None,
        )
    )
    rate = c.streams * c.pace  # deltas per second the load asks for
    found.append(
        Goal(
            f"(d) CPU the load needs at {c.streams:,} streams × {c.pace:g} deltas/s, from each run's CPU per delta",
            f"guarded {c.guarded.cpu_per_delta * rate:.2f} cores, unguarded "
            f"{c.bare.cpu_per_delta * rate:.2f} (this machine: {os.cpu_count()})",
            None,
        )
    )
    runs = (*(rounds.median for rounds in c.fewer), (c.bare, c.guarded))
    keeping_up = [guarded.streams for bare, guarded in runs if concurrency.added_lateness(bare, guarded) < 0.002]
    tried = ", ".join(f"{guarded.streams:,}" for _, guarded in runs)
    found.append(
        Goal(
            "(d) streams one process guards at model pace with p99 added lateness < 2 ms (deltas not held back, "
            "median round)",
            f"{max(keeping_up):,} (of {tried} tried)" if keeping_up else f"none of {tried}",
            None,
        )
    )
    engine_10k = {r.deltas: r.engine for r in results.per_delta.lengths}.get(10_000)
    naive_10k = next((n.mean for n in results.naive.costs if n.deltas == 10_000), None)
    if engine_10k and naive_10k:
        slower = naive_10k / engine_10k
        what = "" if results.naive.has_tokenizer else " (regex rescans only: no tokenizer)"
        found.append(Goal("(b) naive guard ≥ 10× slower at 10,000 deltas", f"{slower:,.0f}×{what}", slower >= 10))
    o = results.holdback.ordinary
    found.append(Goal("(e) ordinary text held: 0 characters", f"{o.ordinary_held:,}", o.ordinary_held == 0))
    found.append(
        Goal(
            "(e) text that could start a match, held in an ordinary answer",
            f"{o.held_chars - o.ordinary_held:,} of {o.chars:,} chars, {o.held_deltas / o.deltas:.1%} of deltas, "
            f"≤ {max(o.hold_deltas, default=0)} delta",
            None,
        )
    )
    overhead = results.metrics["overhead"]
    found.append(Goal("(issue 5) Prometheus metrics add ≤ 10% per delta", f"{overhead:+.1%}", overhead <= 0.10))
    found.sort(key=lambda goal: goal.goal[:3])  # (a) to (e), stable within each
    return found


def goals_table(found: Sequence[Goal]) -> str:
    return md_table(("goal", "measured", "verdict"), [(g.goal, g.measured, g.verdict) for g in found])


def report(results: Everything, found: Sequence[Goal], info: dict[str, str], seconds: float) -> str:
    pd = results.per_delta.lengths
    lengths = ", ".join(f"{r.deltas:,}" for r in pd)
    e = results.e2e
    c = results.concurrency
    n = results.naive
    prof = results.profile
    sections = [
        "# Benchmark results",
        f"Generated by `make bench` (`bench/run.py`) on {time.strftime('%Y-%m-%d %H:%M')}, in {seconds:.0f} s. "
        "Do not edit by hand: run `make bench` again. Each section's script runs on its own too.",
        "Figures are from one run on the machine below; other work on it shows up as noise (the load "
        "average is recorded at the start and the end of the run).",
        "## Machine",
        md_table(("", ""), info.items()),
        rules_note(),
        "## Goals (issue 7)",
        goals_table(found),
        "## (a) Per-delta cost, flat with stream length (`bench/per_delta.py`)",
        f"An ordinary English answer ({lengths} deltas of about one token each: words with their leading "
        "space, punctuation, digit runs, as o200k_base splits text), one `data: {...}` chat.completion.chunk "
        "per delta, guarded by `rules/default.yaml`. *Engine*: `StreamGuard` fed one chunk per call. "
        "*Middleware*: `GuardrailMiddleware` driven by a raw ASGI harness; *bare app* is the harness and "
        "app alone. Best of several runs of a whole stream in CPU time (so that other work on the machine does "
        "not count), divided by its deltas; every length gets the same number of runs, in interleaved rounds.",
        per_delta.table(pd),
        "The flatness ratio, paired: CPU speed on a shared machine drifts by more than the 1.3× being "
        "tested, so the 50,000-delta stream runs in windows of 1,000 deltas with a fresh 1,000-delta stream "
        "run whole after each window; both see the same conditions. Mean cost per delta:",
        per_delta.paired_lines(results.per_delta.paired) if results.per_delta.paired else "(not measured)",
        "## (b) The naive guard: rescan and re-encode everything after every delta (`bench/naive.py`)",
        f"After each delta: all {n.patterns} patterns and phrases of `rules/default.yaml`, each compiled alone, "
        "`search(whole_text, partial=True)`; then the whole text re-encoded with o200k_base (CPU time). Up to "
        f"{naive.FULL_RUN_MAX:,} deltas every delta is timed; longer streams are sampled at {naive.SAMPLES} "
        f"evenly spaced positions ({naive.RUN} consecutive deltas each, median), whose mean estimates the "
        f"stream's mean per-delta cost. Tokenizer: {n.tokenizer}.",
        naive.table(n, {r.deltas: r.engine for r in pd}),
        "## (c) End to end over loopback (`bench/e2e.py`)",
        f"uvicorn in a subprocess on 127.0.0.1 (with the httptools parser and the uvloop event loop, which "
        "it picks up when installed, as guardrail installs them) serving a fake OpenAI stream as fast as it "
        "can (no sleeps), unguarded and through `GuardrailMiddleware`; an httpx client in the benchmark "
        f"process, {e.streams} concurrent streams of {e.deltas:,} deltas, reading and JSON-parsing every SSE "
        f"line and checking the text. Rounds alternate; best of {len(e.rounds) // 2} each. Deltas/s counts "
        "the app's deltas delivered (held text arrives joined to a later event, hence fewer content events).",
        e2e.table(e),
        f"## (d) {c.streams:,} concurrent streams at model pace (`bench/concurrency.py`)",
        f"One process, raw ASGI harness on the {concurrency.event_loop_name()} event loop: {c.streams:,} "
        f"streams × {c.deltas_per_stream} deltas at {c.pace:g} deltas/s each (requests arrive spread over "
        "the first second). *Latency*: from the app's `send` of a delta to the downstream `send` receiving its text "
        "(held-back deltas wait for a later delta). *Lateness*: from when the delta was due to its arrival, "
        "which adds the app's wait for the event loop. CPU is `time.process_time()` over the run. Each run "
        "starts with the process's objects frozen (`gc.freeze()`), as `guardrail serve` does once started, "
        "so that a full collection does not walk the imports (an app with the middleware gets this only if "
        "it freezes its own startup objects): in this process a full collection takes "
        f"{c.collection_ms[0]:.1f} ms, {c.collection_ms[1]:.2f} ms once they are frozen. Memory: tracemalloc, "
        "in a separate pass where every stream "
        f"has sent {concurrency.MEMORY_DELTAS} deltas and waits.",
        concurrency.table(c),
        "The same load with fewer streams, to show where one process stops keeping up. *Added lateness*: "
        "the guarded run's lateness over the deltas it did not hold back, minus the unguarded run's (a "
        f"held-back delta waits for the next one by design: see (e)). {concurrency.FEWER_ROUNDS} paired rounds "
        "(an unguarded run, then a guarded one) at each count, or one when the first guarded run saturates "
        f"the process (CPU ≥ {concurrency.SATURATED:.0%} of wall); the row is the round with the median added "
        "p99 lateness, and the last column gives every round's.",
        concurrency.fewer_table(c),
        "## (e) Hold-back (`bench/holdback.py`)",
        f"`StreamGuard` fed at model pace ({MODEL_PACE:g} deltas/s). Every character is followed from "
        "the delta that brought it to the `Send` that carried it out. *Ordinary*: no pattern of the rule "
        "file matches or partially matches from at or before the character (the naive guard's full "
        "rescan is the oracle). `Released` outputs are summed as a cross-check.",
        holdback.table(results.holdback),
        "## (f) Hot path profile (`bench/profile_hot_path.py`)",
        f"{prof.deltas:,} ordinary deltas through {prof.target} with `rules/default.yaml` "
        f"({prof.unprofiled_us:.1f} µs/delta unprofiled). Shares of own time; ≈ µs/delta scales each share "
        "to the unprofiled cost. `python bench/profile_hot_path.py --top 25 [--middleware]` for more.",
    ]
    if prof.pyinstrument is not None and prof.pyinstrument_files is not None:
        sections += [
            "pyinstrument, top 10 functions:",
            profile_hot_path.table(prof.pyinstrument, prof, 10),
            "pyinstrument, by source file:",
            profile_hot_path.table(prof.pyinstrument_files, prof, 8, what="source file"),
        ]
    sections += [
        "cProfile, top 10 functions (every call traced: small Python functions look costlier than they are):",
        profile_hot_path.table(prof.cprofile, prof, 10),
        "## (g) The floor (`bench/floor.py`)",
        "What the cheapest correct-ish Python guard pays per delta on this workload, step by step (each a "
        "superset of the one before), beside guardrail with the same rule file; CPU time, median of 9 "
        "interleaved rounds of 2,000 deltas (spread in brackets). Streams per process: one core's CPU "
        f"divided by the cost at {MODEL_PACE:g} deltas/s, an estimate rather than a load test.",
        floor.table(results.floor),
        *_compiled_sections(results.compiled),
        "## Metrics overhead (`bench/metrics_overhead.py`, issue 5)",
        "The same streams through `GuardrailMiddleware` reporting to a real `GuardMetrics` and to one whose "
        "methods do nothing, alternating; median CPU time per delta.",
        md_table(
            ("metrics", "µs/delta"),
            [("off", f"{results.metrics['without']:.2f}"), ("on", f"{results.metrics['with']:.2f}")],
        ),
    ]
    return "\n\n".join(sections) + "\n"


def _compiled_sections(compiled: Compiled | None) -> list[str]:
    if compiled is None:
        return ["## (g) The compiled build", "Not measured: no compiled build (`make compiled`)."]
    return [
        "## (g) The compiled build (`bench/compiled.py`)",
        "The same source compiled with mypyc (`make compiled`, setup.py), measured in a process that imports "
        "it: the floor ladder as above (the floor's own steps are plain Python in both), then the concurrency "
        "run of (d) with 250, 600 and 1,000 streams.",
        f"```\n{compiled.output}\n```",
    ]


def main(argv: Sequence[str] | None = None) -> Everything:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    info = machine_info()
    load_at_start = info.pop("load average (1, 5, 15 min)", "")
    step(f"bench: {info['cores']} cores, {info['cpu']}, Python {info['python']}, load {load_at_start}")
    lengths = [str(length) for length in STREAM_LENGTHS]
    step("(a) per-delta cost")
    pd = per_delta.main(["--deltas", *lengths])
    step("(b) naive guard")
    nv = naive.main(["--deltas", *lengths], engine={r.deltas: r.engine for r in pd.lengths})
    step("(c) end to end")
    ee = e2e.main([])
    step("(d) concurrency")
    cc = concurrency.main(["--fewer", "100", "250", "600"])
    step("(e) hold-back")
    hb = holdback.main([])
    step("(f) profile")
    pf = profile_hot_path.main(["--top", "10"])
    step("metrics overhead")
    mo = metrics_overhead.main(["--rules", str(bench_rules()), "--deltas", "3000", "--rounds", "9"])
    step("(g) the floor")
    fl = floor.main(["--deltas", "2000", "--rounds", "9"])
    step("(g) the compiled build")
    cb = run_compiled()
    results = Everything(pd, nv, ee, cc, hb, pf, mo, fl, cb)
    seconds = time.perf_counter() - start
    load_at_end = machine_info().get("load average (1, 5, 15 min)", "")
    if load_at_start:
        info["load average (1, 5, 15 min) at start / end"] = f"{load_at_start} / {load_at_end}"
    found = goals(results)
    args.output.write_text(report(results, found, info, seconds))
    print()
    print(goals_table(found))
    met = sum(1 for g in found if g.met)
    scored = sum(1 for g in found if g.met is not None)
    print(f"\n{met} of {scored} goals met; {seconds:.0f} s in all; wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
