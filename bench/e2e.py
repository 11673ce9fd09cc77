"""End to end over loopback: uvicorn serving a fake OpenAI stream, an httpx client reading it.

The server runs in a subprocess (its own interpreter, so server and client don't share a GIL):
uvicorn on 127.0.0.1 (httptools and uvloop, which it picks up when installed) with one app that
streams a prepared answer as fast as it can (no sleeps), reachable unguarded at
``/bare/v1/chat/completions`` and through ``GuardrailMiddleware`` with ``rules/default.yaml`` at
``/v1/chat/completions``. The client, in this process, runs a few concurrent streams with httpx,
reads the SSE line by line and parses every chunk's JSON, as an SDK does, and checks that every
stream delivered the whole answer.

Throughput is the app's deltas delivered per second of wall time, over all concurrent streams.
Unguarded and guarded rounds alternate, so that a burst of load elsewhere hits both alike; the
best round of each is compared. The server's CPU time per delta (from /proc) shows where the
time goes.

    python bench/e2e.py [--streams 4] [--deltas 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import (
    CHAT_PATH,
    REQUEST_BODY,
    ROOT,
    ASGIApp,
    bench_rules,
    cpu_clock,
    md_table,
    openai_stream,
    prose_deltas,
    step,
    streaming_app,
)

from guardrail._types import Receive, Scope, Send

BARE_PREFIX = "/bare"
SERVER_START_TIMEOUT = 30.0


# -- the server (subprocess) --------------------------------------------------------------------


def server_app(deltas: int, rules: str) -> ASGIApp:
    from guardrail import GuardrailMiddleware

    bare = streaming_app(openai_stream(prose_deltas(deltas)))
    guarded = GuardrailMiddleware(bare, rules=rules)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if path.startswith(BARE_PREFIX + "/"):
            await bare({**scope, "path": path[len(BARE_PREFIX) :]}, receive, send)
        else:
            await guarded(scope, receive, send)

    return app


def serve(deltas: int, rules: str) -> None:
    """Serve until killed, or until the parent process goes away; print the port first."""
    import uvicorn

    parent = os.getppid()

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)  # orphaned: never outlive the benchmark

    threading.Thread(target=watch_parent, daemon=True).start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections made before uvicorn is up wait in the backlog instead of being refused
    config = uvicorn.Config(
        server_app(deltas, rules), log_level="warning", lifespan="off", access_log=False, timeout_keep_alive=30
    )
    print(sock.getsockname()[1], flush=True)
    uvicorn.Server(config).run(sockets=[sock])


class ServerProcess:
    """The server subprocess; a context manager that always kills it."""

    def __init__(self, deltas: int, rules: str) -> None:
        self.deltas = deltas
        self.rules = rules
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> ServerProcess:
        command = [sys.executable, str(Path(__file__).resolve()), "--serve", "--deltas", str(self.deltas)]
        command += ["--rules", self.rules]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert self.proc.stdout is not None
            ready, _, _ = select.select([self.proc.stdout], [], [], SERVER_START_TIMEOUT)
            line = self.proc.stdout.readline() if ready else ""
            if not line.strip().isdigit():
                raise RuntimeError(f"the benchmark server did not start (said {line!r})")
            self.port = int(line)
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def cpu_seconds(self) -> float | None:
        """User plus system CPU time of the server so far (Linux), or None."""
        if self.proc is None:
            return None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the client (this process) ------------------------------------------------------------------


async def read_stream(client: httpx.AsyncClient, url: str) -> tuple[int, str]:
    """One streamed request: (content events received, content text), parsed as an SDK would."""
    events = 0
    parts: list[str] = []
    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    async with client.stream("POST", url, content=REQUEST_BODY, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    events += 1
                    parts.append(content)
    return events, "".join(parts)


@dataclass(frozen=True, slots=True)
class Round:
    guarded: bool
    seconds: float
    deltas: int  # the app's deltas delivered, over all streams
    events: int  # content events the client received (held text is joined to a later event)
    server_cpu: float | None
    client_cpu: float

    @property
    def rate(self) -> float:
        return self.deltas / self.seconds


async def one_round(
    client: httpx.AsyncClient, server: ServerProcess, *, guarded: bool, streams: int, expected: str, deltas: int
) -> Round:
    url = f"http://127.0.0.1:{server.port}{'' if guarded else BARE_PREFIX}{CHAT_PATH}"
    cpu = server.cpu_seconds()
    client_cpu = cpu_clock()
    start = time.perf_counter()
    results = await asyncio.gather(*(read_stream(client, url) for _ in range(streams)))
    seconds = time.perf_counter() - start
    client_cpu = cpu_clock() - client_cpu
    cpu_after = server.cpu_seconds()
    for _, text in results:
        if text != expected:
            raise RuntimeError(f"a {'guarded' if guarded else 'bare'} stream delivered different text")
    server_cpu = cpu_after - cpu if cpu is not None and cpu_after is not None else None
    events = sum(count for count, _ in results)
    return Round(guarded, seconds, deltas * streams, events, server_cpu, client_cpu)


@dataclass(frozen=True, slots=True)
class EndToEnd:
    streams: int
    deltas: int
    rounds: list[Round]

    def best(self, guarded: bool) -> Round:
        return max((r for r in self.rounds if r.guarded is guarded), key=lambda r: r.rate)

    @property
    def ratio(self) -> float:
        return self.best(True).rate / self.best(False).rate


async def run_client(server: ServerProcess, *, streams: int, deltas: int, rounds: int) -> list[Round]:
    expected = "".join(prose_deltas(deltas))
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for guarded in (False, True):  # warm up: imports, first-request work
            await one_round(client, server, guarded=guarded, streams=1, expected=expected, deltas=deltas)
        measured = []
        for number in range(rounds):
            for guarded in (False, True):
                step(f"end to end: round {number + 1}/{rounds}, {'guarded' if guarded else 'unguarded'}")
                measured.append(
                    await one_round(client, server, guarded=guarded, streams=streams, expected=expected, deltas=deltas)
                )
        return measured


def table(result: EndToEnd) -> str:
    rows = []
    for guarded in (False, True):
        best = result.best(guarded)
        cpu = f"{best.server_cpu / best.deltas * 1e6:.1f}" if best.server_cpu is not None else "n/a"
        rates = sorted(r.rate for r in result.rounds if r.guarded is guarded)
        rows.append(
            (
                "guarded (default.yaml)" if guarded else "unguarded",
                f"{best.rate:,.0f}",
                ", ".join(f"{rate:,.0f}" for rate in rates),
                f"{best.seconds:.2f}",
                f"{best.events:,}",
                cpu,
                f"{best.client_cpu / best.deltas * 1e6:.1f}",
            )
        )
    headers = (
        "server",
        "deltas/s (best)",
        "all rounds",
        "seconds (best)",
        "content events",
        "server CPU µs/delta",
        "client CPU µs/delta",
    )
    return md_table(headers, rows) + f"\n\nguarded / unguarded throughput: **{result.ratio:.2f}×**"


def main(argv: Sequence[str] | None = None) -> EndToEnd:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rules", default=None, help="a rule file (default: default.yaml, budget raised)")
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams per round")
    parser.add_argument("--deltas", type=int, default=5_000, help="deltas per stream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rules = args.rules or str(bench_rules())
    if args.serve:
        serve(args.deltas, args.rules)
        raise SystemExit(0)
    step(f"end to end: starting uvicorn in a subprocess ({args.streams} streams × {args.deltas:,} deltas)")
    with ServerProcess(args.deltas, args.rules) as server:
        rounds = asyncio.run(run_client(server, streams=args.streams, deltas=args.deltas, rounds=args.rounds))
    result = EndToEnd(args.streams, args.deltas, rounds)
    print(table(result))
    return result


if __name__ == "__main__":
    main()
