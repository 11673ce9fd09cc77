"""The floor: what the cheapest correct-ish Python guard pays per delta, beside guardrail's cost.

A ladder of guards, each a superset of the one before, on the same workload (OpenAI chat
chunks of ordinary prose, one token each) and in the same harness as the guard:

1. forward only (through ASGI: a middleware that passes ``send`` on);
2. + split the body into SSE events and parse each with orjson;
3. + one combined regex of the rule file's patterns over the new text and a short tail;
4. + hold back a possible match's start and re-serialise every event (the "floor").

then guardrail with the same rule file. Timed in CPU time, median of interleaved rounds (every
guard once per round), with the spread. Prints guardrail ÷ floor for the engine alone and
through ASGI, and the streams one process could keep at 30 deltas/s from each cost (one core,
CPU only: an estimate, not a load test).

    python bench/floor.py [--deltas 2000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson
import regex
from common import (
    MODEL_PACE,
    bench_rules,
    cpu_clock,
    md_table,
    openai_stream,
    prose_deltas,
    run_once,
    streaming_app,
)

from guardrail import GuardrailMiddleware, StreamGuard, load_rules
from guardrail._types import ASGIApp, Message, Receive, Scope, Send
from guardrail.rules.banned import BannedPatterns

TAIL = 64  # characters of earlier text the floor's regex also reads
FLOOR = "+ hold-back + re-serialise (floor)"
Results = dict[str, tuple[list[float], list[float]]]  # step: (engine µs/delta samples, through ASGI)


class FloorGuard:
    """The floor's engine, up to ``level`` (2: parse, 3: + regex, 4: + hold-back and re-serialise)."""

    def __init__(self, pattern: regex.Pattern[str], level: int) -> None:
        self.pattern = pattern
        self.level = level
        self.buffer = b""
        self.tail = ""
        self.held = ""

    def feed(self, data: bytes) -> bytes:
        *events, self.buffer = (self.buffer + data).split(b"\n\n")
        out = []
        for event in events:
            if not event.startswith(b"data: {"):
                out.append(event + b"\n\n")
                continue
            obj = orjson.loads(event[6:])
            choices = obj.get("choices")
            text = choices[0].get("delta", {}).get("content") if choices else None
            if not text or self.level < 3:
                out.append(event + b"\n\n")
                continue
            window = self.tail + self.held + text
            match = self.pattern.search(window, max(0, len(self.tail) - 1), partial=True)
            if self.level < 4:
                self.tail = window[-TAIL:]
                out.append(event + b"\n\n")
                continue
            # Hold back from where a match may still begin; release the rest, re-serialised.
            cut = max(match.start() if match is not None and match.partial else len(window), len(self.tail))
            choices[0]["delta"]["content"] = window[len(self.tail) : cut]
            self.held = window[cut:]
            self.tail = window[:cut][-TAIL:]
            out.append(b"data: " + orjson.dumps(obj) + b"\n\n")
        return b"".join(out)


def floor_middleware(app: ASGIApp, make: Callable[[], FloorGuard] | None) -> ASGIApp:
    """A middleware that passes the body through ``make()``'s guard (None: forward only)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        guard = make() if make is not None else None

        async def guarded(message: Message) -> None:
            if guard is not None and message["type"] == "http.response.body":
                message = {**message, "body": guard.feed(message.get("body", b""))}
            await send(message)

        await app(scope, receive, guarded)

    return middleware


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    engine: Callable[[Sequence[bytes]], float] | None  # CPU seconds for one stream, engine alone
    asgi: ASGIApp | None  # the guard through ASGI


def combined_pattern(rules: Sequence[object]) -> regex.Pattern[str]:
    patterns = [p for rule in rules if isinstance(rule, BannedPatterns) for p in rule.patterns]
    return regex.compile("|".join(f"(?:{p})" for p in patterns))


def measure(deltas: int, rounds: int) -> Results:
    bound = load_rules(str(bench_rules())).rules_for("/v1/chat/completions")
    pattern = combined_pattern([rule.rule for rule in bound])
    chunks = openai_stream(prose_deltas(deltas))

    def floor_engine(level: int) -> Callable[[Sequence[bytes]], float]:
        def run(chunks: Sequence[bytes]) -> float:
            guard = FloorGuard(pattern, level)
            start = cpu_clock()
            for chunk in chunks:
                guard.feed(chunk)
            return cpu_clock() - start

        return run

    def guard_engine(chunks: Sequence[bytes]) -> float:
        guard = StreamGuard(bound, start=0.0)
        start = cpu_clock()
        for index, chunk in enumerate(chunks):
            guard.feed(chunk, index / MODEL_PACE)
        guard.close(len(chunks) / MODEL_PACE)
        return cpu_clock() - start

    app = streaming_app(chunks)
    rules = load_rules(str(bench_rules()))

    def level(number: int) -> Callable[[], FloorGuard]:
        return lambda: FloorGuard(pattern, number)

    steps = [
        Step("forward only", None, floor_middleware(app, None)),
        Step("+ SSE split + orjson", floor_engine(2), floor_middleware(app, level(2))),
        Step("+ one combined regex", floor_engine(3), floor_middleware(app, level(3))),
        Step(FLOOR, floor_engine(4), floor_middleware(app, level(4))),
        Step("guardrail", guard_engine, GuardrailMiddleware(app, rules=rules)),
    ]
    results: Results = {step.name: ([], []) for step in steps}
    count = len(chunks)
    for _ in range(rounds):
        for step in steps:
            engine, asgi = results[step.name]
            if step.engine is not None:
                engine.append(step.engine(chunks) / count * 1e6)
            if step.asgi is not None:
                asgi.append(asyncio.run(run_once(step.asgi)) / count * 1e6)
    return results


def spread(samples: list[float]) -> str:
    if not samples:
        return "–"
    return f"{statistics.median(samples):.1f} ({min(samples):.1f}-{max(samples):.1f})"


def streams(samples: list[float]) -> str:
    return f"{1e6 / (statistics.median(samples) * MODEL_PACE):,.0f}" if samples else "–"


def table(results: Results) -> str:
    rows = [(name, spread(engine), spread(asgi), streams(asgi)) for name, (engine, asgi) in results.items()]
    return md_table(("step", "engine µs/delta", "through ASGI µs/delta", "streams/process at 30 deltas/s"), rows)


def ratios(results: Results) -> tuple[float, float]:
    """guardrail ÷ floor: for the engine alone, and through ASGI (medians)."""
    floor_engine, floor_asgi = results[FLOOR]
    guard_engine, guard_asgi = results["guardrail"]
    return (
        statistics.median(guard_engine) / statistics.median(floor_engine),
        statistics.median(guard_asgi) / statistics.median(floor_asgi),
    )


def main(argv: Sequence[str] | None = None) -> Results:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deltas", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    results = measure(args.deltas, args.rounds)
    engine, asgi = ratios(results)
    print(table(results))
    print(
        f"\nguardrail ÷ floor: engine {engine:.2f}, through ASGI {asgi:.2f} "
        f"(medians of {args.rounds} interleaved rounds of {args.deltas:,} deltas)"
    )
    return results


if __name__ == "__main__":
    main()
