"""Zero leak at scale: 100,000 streams drawn from each dialect's grammar, banned text anywhere.

The same generators and client-side check as ``tests/test_zero_leak.py`` (which runs a few
thousand in ``make test``): every stream is cut at random byte offsets, guarded with ``redact``
or ``abort``, and everything a client can see (JSON strings decoded, each channel joined across
events) is searched for the banned patterns and phrases. Prints, per dialect, streams run and
banned characters that reached the client.

    python bench/zero_leak.py [--streams 100000] [--dialect openai_chat]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guardrail.core.outputs import Send
from guardrail.core.rule import Action
from tests import leakgrammar

ACTIONS = (Action.REDACT, Action.ABORT)


def run(dialect: str, streams: int, seed: int = 0) -> tuple[int, int, float]:
    """Streams guarded, banned characters leaked, seconds taken."""
    generate, read, start = leakgrammar.DIALECTS[dialect]
    leaked = 0
    started = time.perf_counter()
    for number in range(streams):
        rng = random.Random(seed * 1_000_003 + number)
        body = generate(rng)
        guard = start(leakgrammar.rules(ACTIONS[number % 2]))
        outputs = [output for chunk in leakgrammar.rechunk(rng, body) for output in guard.feed(chunk)]
        outputs += guard.close()
        wire = b"".join(output.data for output in outputs if isinstance(output, Send))
        found = leakgrammar.leaks(read(wire))
        if found:
            print(f"  {dialect} stream {number} (seed {seed * 1_000_003 + number}) leaked {found!r}")
        leaked += sum(len(match) for match in found)
    return streams, leaked, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100_000)
    parser.add_argument("--dialect", choices=sorted(leakgrammar.DIALECTS), action="append")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for dialect in args.dialect or sorted(leakgrammar.DIALECTS):
        streams, leaked, seconds = run(dialect, args.streams, args.seed)
        print(f"{dialect}: {streams} streams, {leaked} banned characters leaked ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
