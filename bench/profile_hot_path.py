"""Profile the guard's hot path: where the time of one delta goes, function by function.

Feeds one stream of ordinary deltas (20,000 by default) through ``StreamGuard`` with
``rules/default.yaml``, one OpenAI chunk per call, after a short warm-up stream, and prints the
functions that take the most time of their own, twice:

- pyinstrument (a sampling profiler): C functions (a regex search, a dict method) appear by
  themselves as far as it sees them; own time is also summed by source file;
- cProfile (deterministic: every call is traced, which inflates the cost of small Python
  functions): C functions and methods appear by themselves.

With ``--middleware`` the stream goes through ``GuardrailMiddleware`` and the raw ASGI harness.

    python bench/profile_hot_path.py [--deltas 20000] [--top 25] [--middleware]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common import (
    CHAT_PATH,
    MODEL_PACE,
    ROOT,
    bench_rules,
    cpu_clock,
    md_table,
    openai_stream,
    prose_deltas,
    run_once,
    step,
    streaming_app as make_app,
)

from guardrail import GuardrailMiddleware, StreamGuard, load_rules

WARM_UP_DELTAS = 1_000
# Seconds between samples. pyinstrument's cost is in its per-call hook, not in the sampling, so a
# shorter interval buys little precision; 20,000 deltas give a few thousand samples at this one.
PYINSTRUMENT_INTERVAL = 0.001


@dataclass(frozen=True, slots=True)
class Entry:
    function: str  # name, file:line
    own: float  # seconds of own time
    share: float  # of the profiled total
    calls: int | None = None  # cProfile only


@dataclass(frozen=True, slots=True)
class Profile:
    deltas: int
    target: str
    unprofiled_us: float  # µs per delta without a profiler
    pyinstrument: list[Entry] | None  # None if pyinstrument is not installed
    pyinstrument_files: list[Entry] | None  # own time grouped by source file
    cprofile: list[Entry]


def workload(deltas: int, *, middleware: bool) -> Callable[[], None]:
    """A function that guards one whole stream of ``deltas`` deltas."""
    chunks = openai_stream(prose_deltas(deltas))
    if middleware:
        guarded = GuardrailMiddleware(make_app(chunks), rules=str(bench_rules()))
        return lambda: asyncio.run(_discard(run_once(guarded)))
    rules = load_rules(str(bench_rules())).rules_for(CHAT_PATH)

    def run() -> None:
        guard = StreamGuard(rules, start=0.0)
        for index, chunk in enumerate(chunks):
            guard.feed(chunk, index / MODEL_PACE)
        guard.close(len(chunks) / MODEL_PACE)

    return run


async def _discard(timing: object) -> None:
    await timing  # type: ignore[misc]


def short_path(path: str) -> str:
    """``path`` relative to the repository, site-packages or the standard library, where it is in one."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    for base in (str(ROOT), sysconfig.get_paths()["stdlib"]):
        if path.startswith(base + os.sep):
            return path[len(base) + 1 :]
    return path


def _where(path: str | None, line: int | None) -> str:
    if not path:
        return ""
    shown = short_path(path)
    return f"{shown}:{line}" if line else shown


def with_pyinstrument(run: Callable[[], None], top: int) -> tuple[list[Entry], list[Entry]] | None:
    """The ``top`` functions and files by own time; None if pyinstrument is not installed."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        return None
    profiler = Profiler(interval=PYINSTRUMENT_INTERVAL, async_mode="disabled")
    profiler.start()
    run()
    session = profiler.stop()
    root = session.root_frame()
    if root is None:
        return [], []
    own: dict[str, float] = {}
    by_file: dict[str, float] = {}
    stack = [root]
    while stack:
        frame = stack.pop()
        stack.extend(frame.children)
        if frame.is_synthetic:
            continue
        where = _where(frame.file_path, frame.line_no)
        if where.startswith("<") and frame.parent is not None:
            where += f", from {frame.parent.function}"  # generated code, such as a dataclass's __init__
        key = f"{frame.function} ({where})"
        own[key] = own.get(key, 0.0) + frame.total_self_time
        file = short_path(frame.file_path) if frame.file_path and not frame.file_path.startswith("<") else "(built-in)"
        by_file[file] = by_file.get(file, 0.0) + frame.total_self_time
    total = root.time or 1.0
    ranked = sorted(own.items(), key=lambda item: item[1], reverse=True)[:top]
    files = sorted(by_file.items(), key=lambda item: item[1], reverse=True)[:top]
    return (
        [Entry(name, seconds, seconds / total) for name, seconds in ranked],
        [Entry(name, seconds, seconds / total) for name, seconds in files],
    )


def with_cprofile(run: Callable[[], None], top: int) -> list[Entry]:
    profiler = cProfile.Profile()
    profiler.runcall(run)
    stats = pstats.Stats(profiler)
    table = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in table.values()) or 1.0
    ranked = sorted(table.items(), key=lambda item: item[1][2], reverse=True)[:top]
    entries = []
    for (path, line, name), (_, calls, own, _, _) in ranked:
        where = _where(path, line) if path != "~" else "built-in"
        entries.append(Entry(f"{name} ({where})", own, own / total, calls))
    return entries


def table(entries: Sequence[Entry], profile: Profile, limit: int | None = None, *, what: str = "function") -> str:
    """Own time per function: its share of the profiled run, and that share of the unprofiled µs/delta.

    Profilers slow the code down unevenly, so absolute profiled times mislead; the shares are the
    profile's finding, scaled to the unprofiled cost for a sense of size.
    """
    rows = []
    for entry in entries[:limit]:
        row = [
            entry.function.replace("|", "\\|"),
            f"{entry.share:.1%}",
            f"{entry.share * profile.unprofiled_us:.1f}",
        ]
        if entry.calls is not None:
            row.append(f"{entry.calls / profile.deltas:.1f}")
        rows.append(row)
    headers = [what, "share of own time", "≈ µs/delta"]
    if entries and entries[0].calls is not None:
        headers.append("calls/delta")
    return md_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> Profile:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--deltas", type=int, default=20_000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--middleware", action="store_true", help="profile through GuardrailMiddleware")
    args = parser.parse_args(argv)
    target = "GuardrailMiddleware (raw ASGI harness)" if args.middleware else "StreamGuard"
    workload(WARM_UP_DELTAS, middleware=args.middleware)()
    run = workload(args.deltas, middleware=args.middleware)
    step(f"profile: {args.deltas:,} deltas through {target}, unprofiled")
    start = cpu_clock()
    run()
    unprofiled = (cpu_clock() - start) / args.deltas * 1e6
    step("profile: pyinstrument")
    sampled = with_pyinstrument(run, args.top)
    step("profile: cProfile")
    traced = with_cprofile(run, args.top)
    functions, files = sampled if sampled is not None else (None, None)
    result = Profile(args.deltas, target, unprofiled, functions, files, traced)
    print(f"{target}, {args.deltas:,} deltas, unprofiled: {unprofiled:.1f} µs/delta")
    if functions is None or files is None:
        print("pyinstrument is not installed (pip install -e '.[bench]'): cProfile only")
    else:
        print(f"\npyinstrument, top {args.top} functions by own time:\n")
        print(table(functions, result))
        print("\npyinstrument, own time by source file:\n")
        print(table(files, result, what="source file"))
    print(f"\ncProfile, top {args.top} by own time (tracing overhead inflates small Python functions):\n")
    print(table(traced, result))
    return result


if __name__ == "__main__":
    main()
