"""Per-delta cost of the guard through GuardrailMiddleware, at growing stream lengths.

Drives the middleware with a raw ASGI harness (no server, no sockets), so the figures are the
guard's own cost: SSE decoding, JSON parsing, every rule of the rule file, re-rendering and the
ASGI plumbing. The app sends one OpenAI chunk per body message, the way a model server does.

    python bench/per_delta.py [--rules rules/default.yaml] [--deltas 1000 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

from guardrail import GuardrailMiddleware
from guardrail._types import Message, Receive, Scope, Send

WORDS = (
    "The quick brown fox jumps over the lazy dog while the model keeps writing an ordinary answer "
    "about streaming guards, token budgets, and why text should never wait longer than it must. "
).split(" ")


def openai_chunks(deltas: int) -> list[bytes]:
    """A role chunk, ``deltas`` content chunks of about one token each, a finish chunk and [DONE]."""

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [choice],
        }
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    body = [event({"role": "assistant", "content": ""})]
    body += [event({"content": " " + WORDS[i % len(WORDS)]}) for i in range(deltas)]
    body += [event({}, "stop"), b"data: [DONE]\n\n"]
    return body


def streaming_app(chunks: Sequence[bytes]) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


async def one_stream(app: Any) -> float:
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "query_string": b""}

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        pass

    start = time.perf_counter()
    await app(scope, receive, send)
    return time.perf_counter() - start


def measure(rules: str | None, deltas: int, repeats: int) -> float:
    """Best-of-``repeats`` microseconds per delta for one stream of ``deltas`` deltas."""
    chunks = openai_chunks(deltas)
    app = streaming_app(chunks)
    guarded = GuardrailMiddleware(app, rules=rules) if rules else app
    timings = [asyncio.run(one_stream(guarded)) for _ in range(repeats)]
    return min(timings) / deltas * 1e6


def main(argv: Sequence[str] | None = None) -> dict[int, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default="rules/default.yaml")
    parser.add_argument("--deltas", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    results: dict[int, tuple[float, float]] = {}
    print(f"rules: {args.rules}")
    print(f"{'deltas':>8} {'unguarded µs/delta':>20} {'guarded µs/delta':>18} {'guard cost µs/delta':>20}")
    for deltas in args.deltas:
        bare = measure(None, deltas, args.repeats)
        guarded = measure(args.rules, deltas, args.repeats)
        results[deltas] = (bare, guarded)
        print(f"{deltas:>8} {bare:>20.2f} {guarded:>18.2f} {guarded - bare:>20.2f}")
    costs = [guarded - bare for bare, guarded in results.values()]
    if len(costs) > 1:
        print(f"cost at {args.deltas[-1]} deltas / cost at {args.deltas[0]} deltas: {costs[-1] / costs[0]:.2f}")
    print(f"(median of guard cost: {statistics.median(costs):.2f} µs/delta)")
    return results


if __name__ == "__main__":
    main()
