"""1,000 concurrent streams at model pace in one process: the latency the guard adds, its CPU and memory.

A raw ASGI harness (no server, no sockets) runs ``--streams`` streams at once, each an app that
sends ``--deltas`` OpenAI chunks at ``--pace`` deltas per second. The requests arrive spread over
the first second, each one delta's time before its first delta. The downstream ``send`` of each
stream records when each body arrives. The same run is made unguarded and through
``GuardrailMiddleware`` with ``rules/default.yaml``, on uvloop's event loop when it is installed
(as uvicorn would run), and again with ``--fewer`` streams, to show how many one process keeps
up with.

For every delta:
- latency: from the app's ``send`` call to the downstream ``send`` receiving its text. Unguarded
  it is a function call; guarded it is the guard's own cost, plus hold-back when the delta ends
  in text that could start a banned match (released with a later delta);
- lateness: from when the delta was due (its place in the schedule) to its arrival downstream.
  This adds the time the app waited for the event loop: it grows when the process cannot keep
  up with the load, which the send-to-send latency alone would not show.

Each run starts with the objects the process holds frozen (``gc.freeze()``), as ``guardrail serve``
does once started: a full collection then walks what the streams keep, not the imports (a pause
of tens of milliseconds otherwise, in which no stream moves). A short stream is guarded first, so
that the imports of a first request do not land in the timed run.

CPU is ``time.process_time()`` over the run. Memory per stream is measured apart, with
tracemalloc (which slows everything down, so not during the timed run): every stream sends
``MEMORY_DELTAS`` deltas and waits; the traced memory then, over the streams, is the memory per
open stream, guarded minus unguarded the guard's share. The client's side keeps the times its
bodies arrived but not the bodies: a server lets go of a body once it is sent, so a copy the
client keeps is not the server's memory (the guard's rewritten events would count, the app's
own events, shared, would not).

    python bench/concurrency.py [--streams 1000] [--deltas 150] [--pace 30] [--fewer 100 250 500]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from common import (
    MODEL_PACE,
    ASGIApp,
    Receiver,
    bench_rules,
    chat_scope,
    md_table,
    openai_event,
    percentile,
    prose_deltas,
    step,
    stream_text,
)

from guardrail import GuardrailMiddleware
from guardrail._types import Message, Receive, Scope, Send

STAGGER_SECONDS = 1.0  # stream starts are spread over this long, as real traffic would be
MEMORY_DELTAS = 10  # deltas each stream has sent when memory is measured
TEXT_VARIANTS = 10  # distinct answers among the streams
FEWER_ROUNDS = 3  # rounds at each of the fewer stream counts
SATURATED = 0.9  # CPU time over wall time at which one process no longer keeps up


@dataclass(slots=True)
class Probe:
    """One stream's schedule and what its client received, and when."""

    deltas: list[str]
    chunks: list[bytes]
    scheduled: list[float] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    # What arrived, as three lists rather than a tuple per body: tuples are objects the garbage
    # collector tracks, and thousands a second would set off collections the guard did not cause.
    received_at: list[float] = field(default_factory=list)
    sent_by_then: list[int] = field(default_factory=list)  # deltas the app had sent when it arrived
    bodies: list[bytes] = field(default_factory=list)
    keep_bodies: bool = True

    async def downstream(self, message: Message) -> None:
        if message["type"] == "http.response.body":
            self.received_at.append(time.perf_counter())
            self.sent_by_then.append(len(self.sent_at))
            if self.keep_bodies:
                self.bodies.append(message.get("body", b""))


def paced_app(probes: Sequence[Probe], barrier: asyncio.Event | None = None) -> ASGIApp:
    """The app: stream ``scope["bench.stream"]``'s chunks on its schedule (or, with ``barrier``, wait there)."""
    role = openai_event({"role": "assistant", "content": "", "refusal": None})
    finish = openai_event({}, "stop")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        probe = probes[scope["bench.stream"]]
        await receive()
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": role, "more_body": True})
        for index, chunk in enumerate(probe.chunks):
            if barrier is not None and index == MEMORY_DELTAS:
                await barrier.wait()
            delay = probe.scheduled[index] - time.perf_counter() if probe.scheduled else 0.0
            # A stream behind schedule still yields once per delta, as an app awaiting its upstream
            # does: otherwise it would hog the loop until it ends and starve every other stream.
            await asyncio.sleep(max(0.0, delay))
            probe.sent_at.append(time.perf_counter())
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": finish + b"data: [DONE]\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def make_probes(streams: int, deltas: int) -> list[Probe]:
    variants = [prose_deltas(deltas, seed=seed) for seed in range(TEXT_VARIANTS)]
    chunks = [[openai_event({"content": text}) for text in variant] for variant in variants]
    return [Probe(variants[k % TEXT_VARIANTS], chunks[k % TEXT_VARIANTS]) for k in range(streams)]


async def drive(app: ASGIApp, probes: Sequence[Probe], *, pace: float | None) -> None:
    rng = random.Random(1)
    start = time.perf_counter() + 0.05
    arrivals: dict[int, float] = {}  # when each request arrives, one delta's time before its first delta
    if pace:
        for index, probe in enumerate(probes):
            arrivals[index] = begin = start + rng.uniform(0, STAGGER_SECONDS)
            probe.scheduled = [begin + (delta + 1) / pace for delta in range(len(probe.chunks))]

    async def one(index: int, probe: Probe) -> None:
        if index in arrivals:
            await asyncio.sleep(max(0.0, arrivals[index] - time.perf_counter()))
        scope = chat_scope()
        scope["bench.stream"] = index
        receiver = Receiver()
        try:
            await app(scope, receiver, probe.downstream)
        finally:
            receiver.gone.set()

    await asyncio.gather(*(one(index, probe) for index, probe in enumerate(probes)))


@dataclass(frozen=True, slots=True)
class PacedRun:
    guarded: bool
    streams: int
    deltas: int  # over all streams
    wall: float
    cpu: float
    latency: list[float]  # seconds, every delta
    latency_unheld: list[float]  # seconds, deltas delivered by their own send
    lateness: list[float]  # seconds, every delta
    lateness_unheld: list[float]  # seconds, deltas delivered by their own send
    held: int  # deltas delivered by a later send

    @property
    def cpu_per_delta(self) -> float:
        """CPU seconds per delta, over the whole run."""
        return self.cpu / self.deltas

    @property
    def busy(self) -> float:
        """CPU time over wall time: 1.0 is one core kept busy throughout."""
        return self.cpu / self.wall


def analyse(probes: Sequence[Probe], *, guarded: bool, wall: float, cpu: float) -> PacedRun:
    latency: list[float] = []
    unheld: list[float] = []
    lateness: list[float] = []
    lateness_unheld: list[float] = []
    held = 0
    for probe in probes:
        cumulative: list[int] = []
        total = 0
        for text in probe.deltas:
            total += len(text)
            cumulative.append(total)
        received = 0
        pending = 0  # the next delta not yet seen downstream
        for when, sent, body in zip(probe.received_at, probe.sent_by_then, probe.bodies, strict=True):
            received += len(stream_text(body))
            while pending < len(cumulative) and cumulative[pending] <= received:
                latency.append(when - probe.sent_at[pending])
                lateness.append(when - probe.scheduled[pending])
                if sent > pending + 1:
                    held += 1
                else:
                    unheld.append(latency[-1])
                    lateness_unheld.append(lateness[-1])
                pending += 1
        if pending != len(cumulative) or received != total:
            raise RuntimeError(f"a {'guarded' if guarded else 'bare'} stream lost text ({received} of {total} chars)")
    return PacedRun(guarded, len(probes), len(latency), wall, cpu, latency, unheld, lateness, lateness_unheld, held)


def event_loop() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's event loop when installed (uvicorn runs on it then), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def event_loop_name() -> str:
    return "uvloop" if event_loop() is not asyncio.new_event_loop else "asyncio"


def paced_run(streams: int, deltas: int, pace: float, *, guarded: bool) -> PacedRun:
    """Run ``streams`` streams at ``pace`` at once, unguarded or through the middleware, and analyse them."""
    probes = make_probes(streams, deltas)
    app = paced_app(probes)
    wrapped = GuardrailMiddleware(app, rules=str(bench_rules())) if guarded else app
    # As `guardrail serve` does once started: what exists now stays out of every collection.
    gc.collect()
    gc.freeze()
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        with asyncio.Runner(loop_factory=event_loop()) as runner:
            runner.run(drive(wrapped, probes, pace=pace))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        gc.unfreeze()
    return analyse(probes, guarded=guarded, wall=wall, cpu=cpu)


def warm_up() -> None:
    """Guard one short stream first: the imports of a first request are not the load's to pay."""
    probes = make_probes(1, 5)
    wrapped = GuardrailMiddleware(paced_app(probes), rules=str(bench_rules()))
    with asyncio.Runner(loop_factory=event_loop()) as runner:
        runner.run(drive(wrapped, probes, pace=None))


def memory_per_stream(streams: int, *, guarded: bool) -> float:
    """Traced bytes per open stream after each has sent ``MEMORY_DELTAS`` deltas (see module docstring)."""
    probes = make_probes(streams, MEMORY_DELTAS + 1)
    for probe in probes:
        probe.keep_bodies = False
    barrier = asyncio.Event()
    app = paced_app(probes, barrier)
    wrapped = GuardrailMiddleware(app, rules=str(bench_rules())) if guarded else app

    async def measure() -> float:
        gc.collect()
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            task = asyncio.ensure_future(drive(wrapped, probes, pace=None))
            while sum(len(p.sent_at) >= MEMORY_DELTAS for p in probes) < len(probes):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # let the last sends settle
            gc.collect()
            used = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            tracemalloc.stop()
        barrier.set()
        await task
        return used / streams

    return asyncio.run(measure())


@dataclass(frozen=True, slots=True)
class Concurrency:
    streams: int
    deltas_per_stream: int
    pace: float
    bare: PacedRun
    guarded: PacedRun
    memory_bare: float  # bytes per stream
    memory_guarded: float
    fewer: tuple[Rounds, ...] = ()  # at fewer streams
    collection_ms: tuple[float, float] = (0.0, 0.0)  # a full collection, startup objects as they are / frozen

    def added(self, fraction: float, attribute: str = "latency") -> float:
        """Guarded minus unguarded quantile of ``attribute``, in seconds."""
        guarded, bare = getattr(self.guarded, attribute), getattr(self.bare, attribute)
        return percentile(guarded, fraction) - percentile(bare, fraction)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def table(result: Concurrency) -> str:
    rows = []
    for run in (result.bare, result.guarded):
        rows.append(
            (
                "guarded (default.yaml)" if run.guarded else "unguarded",
                f"{run.deltas:,}",
                f"{run.wall:.1f}",
                f"{run.deltas / run.wall:,.0f}",
                f"{run.cpu:.1f}",
                f"{run.cpu_per_delta * 1e6:.1f}",
                f"{run.busy:.0%}",
                _ms(percentile(run.latency, 0.5)),
                _ms(percentile(run.latency, 0.99)),
                _ms(max(run.latency)),
                f"{run.held:,}",
                _ms(percentile(run.latency_unheld, 0.99)) if run.latency_unheld else "n/a",
                _ms(percentile(run.lateness, 0.5)),
                _ms(percentile(run.lateness, 0.99)),
            )
        )
    headers = (
        "run",
        "deltas",
        "wall s",
        "deltas/s",
        "CPU s",
        "CPU µs/delta",
        "CPU/wall",
        "latency p50 ms",
        "latency p99 ms",
        "latency max ms",
        "deltas held back",
        "latency p99 ms, deltas not held",
        "lateness p50 ms",
        "lateness p99 ms",
    )
    added = md_table(
        ("added by the guard", "p50 ms", "p99 ms", "max ms"),
        [
            ("latency (send to send)", _ms(result.added(0.5)), _ms(result.added(0.99)), _ms(result.added(1.0))),
            (
                "latency, deltas not held",
                _ms(result.added(0.5, "latency_unheld")),
                _ms(result.added(0.99, "latency_unheld")),
                _ms(result.added(1.0, "latency_unheld")),
            ),
            (
                "lateness (schedule to send)",
                _ms(result.added(0.5, "lateness")),
                _ms(result.added(0.99, "lateness")),
                _ms(result.added(1.0, "lateness")),
            ),
        ],
    )
    memory = md_table(
        ("memory per open stream", "KiB"),
        [
            ("unguarded (app and harness)", f"{result.memory_bare / 1024:.1f}"),
            ("guarded", f"{result.memory_guarded / 1024:.1f}"),
            ("the guard's share", f"{(result.memory_guarded - result.memory_bare) / 1024:.1f}"),
        ],
    )
    return "\n\n".join((md_table(headers, rows), added, memory))


def added_lateness(bare: PacedRun, guarded: PacedRun, fraction: float = 0.99) -> float:
    """The guard's added lateness at ``fraction``, in seconds, over the deltas it did not hold back."""
    return percentile(guarded.lateness_unheld, fraction) - percentile(bare.lateness, fraction)


def fewer_table(result: Concurrency) -> str:
    """The same load with fewer streams: where one process stops keeping up."""
    rows = []
    every = [*result.fewer, Rounds(((result.bare, result.guarded),))]
    for rounds in every:
        bare, guarded = rounds.median
        rows.append(
            (
                f"{guarded.streams:,}",
                f"{len(rounds.pairs)}",
                f"{guarded.deltas / guarded.wall:,.0f}",
                f"{bare.busy:.0%}",
                f"{guarded.busy:.0%}",
                f"{guarded.cpu_per_delta * 1e6:.1f}",
                _ms(percentile(bare.lateness, 0.99)),
                _ms(percentile(guarded.lateness, 0.99)),
                _ms(percentile(guarded.lateness_unheld, 0.99)),
                _ms(added_lateness(bare, guarded, 0.5)),
                _ms(added_lateness(bare, guarded)),
                ", ".join(_ms(added) for added in rounds.added_p99),
            )
        )
    headers = (
        "streams",
        "rounds",
        "deltas/s",
        "unguarded CPU/wall",
        "guarded CPU/wall",
        "guarded CPU µs/delta",
        "unguarded lateness p99 ms",
        "guarded lateness p99 ms",
        "guarded lateness p99 ms, deltas not held",
        "added lateness p50 ms, deltas not held",
        "added lateness p99 ms, deltas not held",
        "the same, each round",
    )
    return md_table(headers, rows)


@dataclass(frozen=True, slots=True)
class Rounds:
    """Paired rounds at one stream count: each an unguarded run, then a guarded one."""

    pairs: tuple[tuple[PacedRun, PacedRun], ...]

    @property
    def added_p99(self) -> list[float]:
        """Each round's added p99 lateness (seconds, deltas not held back), in round order."""
        return [added_lateness(bare, guarded) for bare, guarded in self.pairs]

    @property
    def median(self) -> tuple[PacedRun, PacedRun]:
        """The round whose added p99 lateness is the median (the lower middle one of an even count)."""
        added = self.added_p99  # each round's percentiles, computed once
        ranked = sorted(range(len(self.pairs)), key=added.__getitem__)
        return self.pairs[ranked[(len(ranked) - 1) // 2]]


def fewer_streams(streams: int, deltas: int, pace: float, rounds: int) -> Rounds:
    """``rounds`` paired rounds at ``streams`` streams, each an unguarded run and then a guarded one.

    A stall of the shared machine decides a p99 of a few thousand deltas, so one round alone can
    say little. If the first guarded run saturates the process (CPU ``SATURATED`` of wall or
    more), more rounds cannot change that: only one is run.
    """
    pairs: list[tuple[PacedRun, PacedRun]] = []
    for number in range(rounds):
        step(f"concurrency: {streams:,} unguarded and guarded streams × {deltas} deltas at {pace:g}/s, #{number + 1}")
        bare = paced_run(streams, deltas, pace, guarded=False)
        guarded = paced_run(streams, deltas, pace, guarded=True)
        pairs.append((bare, guarded))
        if number == 0 and guarded.busy >= SATURATED:
            break
    return Rounds(tuple(pairs))


def full_collection_ms(repeats: int = 3) -> tuple[float, float]:
    """A full collection of this process (best of ``repeats``, ms): with its objects as they are, then frozen."""
    timings: list[float] = []
    for frozen in (False, True):
        if frozen:
            gc.freeze()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            gc.collect()
            best = min(best, time.perf_counter() - start)
        timings.append(best * 1e3)
    gc.unfreeze()
    return timings[0], timings[1]


def main(argv: Sequence[str] | None = None) -> Concurrency:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--streams", type=int, default=1_000)
    parser.add_argument("--deltas", type=int, default=150, help="deltas per stream")
    parser.add_argument("--pace", type=float, default=MODEL_PACE, help="deltas per second per stream")
    parser.add_argument(
        "--fewer", type=int, nargs="*", default=[100, 250, 500], help="also run these stream counts (fewer_table)"
    )
    parser.add_argument(
        "--rounds", type=int, default=FEWER_ROUNDS, help="paired rounds at each of the fewer stream counts"
    )
    args = parser.parse_args(argv)
    warm_up()
    collection = full_collection_ms()
    fewer = [fewer_streams(streams, args.deltas, args.pace, args.rounds) for streams in args.fewer]
    results: dict[bool, PacedRun] = {}
    for guarded in (False, True):
        label = "guarded" if guarded else "unguarded"
        step(f"concurrency: {args.streams:,} {label} streams × {args.deltas} deltas at {args.pace:g}/s")
        results[guarded] = paced_run(args.streams, args.deltas, args.pace, guarded=guarded)
    memory: dict[bool, float] = {}
    for guarded in (False, True):
        step(f"concurrency: memory of {args.streams:,} open {'guarded' if guarded else 'unguarded'} streams")
        memory[guarded] = memory_per_stream(args.streams, guarded=guarded)
    result = Concurrency(
        args.streams,
        args.deltas,
        args.pace,
        results[False],
        results[True],
        memory[False],
        memory[True],
        tuple(fewer),
        collection,
    )
    print(f"a full collection: {collection[0]:.1f} ms; with the startup objects frozen: {collection[1]:.2f} ms")
    print(table(result))
    print(fewer_table(result))
    return result


if __name__ == "__main__":
    main()
