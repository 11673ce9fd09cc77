"""What Prometheus metrics add to the guard's per-delta cost.

Runs the same streams through GuardrailMiddleware twice, once reporting to a real GuardMetrics
(on a private registry) and once to one whose methods do nothing, alternating runs so that the
machine's drift hits both alike. The goal (issue 5) is at most 10% more per delta.

    python bench/metrics_overhead.py [--rules rules/default.yaml] [--deltas 5000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

from common import Receiver, chat_scope
from prometheus_client import CollectorRegistry

from guardrail import GuardrailMiddleware
from guardrail._types import Message, Receive, Scope, Send
from guardrail.metrics import GuardMetrics

WORDS = "The model keeps writing an ordinary answer about streaming guards and token budgets.".split()


class SilentMetrics(GuardMetrics):
    """GuardMetrics that records nothing: the baseline."""

    def stream_started(self, dialect: str) -> None:
        pass

    def stream_finished(
        self, dialect: str, outcome: str, *, duration: float, time_to_first_token: float | None
    ) -> None:
        pass

    def delta(self, dialect: str, check_seconds: float, count: int = 1, *, sampled: bool = True) -> None:
        pass

    def intervention(self, rule: str, action: str, *, leaked_chars: int = 0) -> None:
        pass

    def held(self, chars: int, seconds: float) -> None:
        pass

    def tokens(self, kind: str, count: int) -> None:
        pass

    def anomaly(self, kind: str) -> None:
        pass


def chunks(deltas: int) -> list[bytes]:
    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    body = [event({"role": "assistant", "content": ""})]
    body += [event({"content": " " + WORDS[i % len(WORDS)]}) for i in range(deltas)]
    return [*body, event({}, "stop"), b"data: [DONE]\n\n"]


def app_for(body: Sequence[bytes]) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for part in body:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


async def one_stream(app: Any) -> float:
    async def send(message: Message) -> None:
        pass

    start = time.process_time()
    await app(chat_scope(), Receiver(), send)
    return time.process_time() - start


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default="rules/default.yaml")
    parser.add_argument("--deltas", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    body = chunks(args.deltas)
    with_metrics = GuardrailMiddleware(app_for(body), rules=args.rules, metrics=GuardMetrics(CollectorRegistry()))
    without = GuardrailMiddleware(app_for(body), rules=args.rules, metrics=SilentMetrics(CollectorRegistry()))
    timings: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(args.rounds):
        for name, app in (("without", without), ("with", with_metrics)):
            timings[name].append(asyncio.run(one_stream(app)) / args.deltas * 1e6)
    result = {name: statistics.median(values) for name, values in timings.items()}
    result["overhead"] = result["with"] / result["without"] - 1
    print(f"rules: {args.rules}, {args.deltas} deltas per stream, median of {args.rounds} rounds")
    print(f"{'metrics':>10} {'µs/delta':>10}")
    print(f"{'off':>10} {result['without']:>10.2f}")
    print(f"{'on':>10} {result['with']:>10.2f}")
    print(f"metrics add {result['overhead'] * 100:.1f}% per delta (goal: at most 10%)")
    return result


if __name__ == "__main__":
    main()
