"""The floor ladder and the concurrency run again, in the build this process imports.

``bench/run.py`` runs this in a subprocess whose ``PYTHONPATH`` puts the compiled build
(``make compiled``: ``build/compiled``) first, so that every figure of the issue that depends on
the build is measured in both. Prints the tables, then one JSON line of the figures run.py reads.

    PYTHONPATH=build/compiled python bench/compiled.py [--streams 1000] [--fewer 250 600]
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
from collections.abc import Sequence
from typing import Any

import concurrency
import floor
from common import step

import guardrail.core.engine


def build() -> str:
    """Which build of guardrail this process imports: "compiled" or "source"."""
    compiled = (guardrail.core.engine.__file__ or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    return "compiled" if compiled else "source"


def summary(result: concurrency.Concurrency) -> dict[str, Any]:
    """Per stream count: the guard's added p99 lateness on deltas not held back (median round), in ms."""
    every = [*result.fewer, concurrency.Rounds(((result.bare, result.guarded),))]
    added = {}
    for rounds in every:
        bare, guarded = rounds.median
        added[guarded.streams] = concurrency.added_lateness(bare, guarded) * 1e3
    return {
        "added_p99_ms": added,
        "busy": {guarded.streams: guarded.busy for _, guarded in (r.median for r in every)},
        "memory_bare": result.memory_bare,
        "memory_guarded": result.memory_guarded,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--streams", type=int, default=1_000)
    parser.add_argument("--fewer", type=int, nargs="*", default=[250, 600])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    which = build()
    step(f"{which} build: the floor")
    floor_results = floor.main(["--deltas", "2000", "--rounds", "9"])
    step(f"{which} build: concurrency")
    fewer = ["--fewer", *map(str, args.fewer), "--rounds", str(args.rounds)]
    result = concurrency.main(["--streams", str(args.streams), *fewer])
    figures = {"build": which, "floor": floor_results, "concurrency": summary(result)}
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
