"""Metrics as an operator sees them: scraped over a real socket, with bounded series."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Mount, Route

from guardrail import Action, BannedPatterns, BoundRule, GuardrailMiddleware, RuleSet
from guardrail.metrics import GuardMetrics, metrics_app
from tests.apps import CHAT_PATH, ChatChunks, Receiver, Recorder, http_scope, replay_app
from tests.servers import serve_in_thread

KEY = "sk-" + "Z" * 30
ANSWERS = {
    "abort": ["Here is a secret: ", "the project ", "starlight plan."],
    "redact": ["Your key is ", KEY[:10], KEY[10:], " keep it safe."],
    "clean": ["Nothing to ", "see here, ", "just ordinary text."],
}


def rules() -> RuleSet:
    return RuleSet.from_rules(
        [
            BoundRule("codenames", BannedPatterns(phrases=["project starlight"]), Action.ABORT),
            BoundRule("keys", BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"]), Action.REDACT),
        ],
        paths=[CHAT_PATH],
    )


def scrape(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{base_url}/metrics/", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_scrape_over_a_socket_shows_what_the_guard_did() -> None:
    registry = CollectorRegistry()
    chunks = ChatChunks()

    async def completions(request: Request) -> StreamingResponse:
        kind = (await request.json())["kind"]

        async def body() -> AsyncIterator[bytes]:
            for part in chunks.stream(ANSWERS[kind]):
                yield part

        return StreamingResponse(body(), media_type="text/event-stream")

    app = Starlette(
        routes=[Route(CHAT_PATH, completions, methods=["POST"]), Mount("/metrics", metrics_app(registry))],
        middleware=[Middleware(GuardrailMiddleware, rules=rules(), metrics=GuardMetrics(registry))],
    )
    sent_deltas = 0
    with serve_in_thread(app) as base_url:
        before = scrape(base_url)
        with httpx.Client(base_url=base_url, timeout=10) as client:
            for kind in ("abort", "redact", "clean", "clean"):
                client.post(CHAT_PATH, json={"kind": kind, "stream": True}).raise_for_status()
                sent_deltas += len(ANSWERS[kind])
        after = scrape(base_url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("guardrail_interventions_total", rule="codenames", action="abort") == 1
    assert delta("guardrail_interventions_total", rule="keys", action="redact") == 1
    streams = sum(v for (name, _), v in after.items() if name == "guardrail_streams_total")
    streams -= sum(v for (name, _), v in before.items() if name == "guardrail_streams_total")
    assert streams == 4
    assert delta("guardrail_streams_total", dialect="openai_chat", outcome="aborted") == 1
    assert delta("guardrail_streams_total", dialect="openai_chat", outcome="completed") == 3
    assert value(after, "guardrail_active_streams") == 0
    assert delta("guardrail_leaked_chars_total", rule="codenames") == 0
    assert delta("guardrail_leaked_chars_total", rule="keys") == 0
    # The aborted stream stops at the trip, so it may have been checked on fewer deltas than sent.
    assert delta("guardrail_deltas_total", dialect="openai_chat") >= sent_deltas - len(ANSWERS["abort"]) + 2


def series(registry: CollectorRegistry) -> int:
    return sum(len(metric.samples) for metric in registry.collect())


@pytest.mark.anyio
async def test_long_streams_and_many_paths_and_models_keep_the_series_bounded() -> None:
    registry = CollectorRegistry()
    chunks = ChatChunks()
    long_stream = chunks.stream([f" word{i}" for i in range(10_000)])
    app = replay_app(
        [
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]},
            *({"type": "http.response.body", "body": part, "more_body": True} for part in long_stream),
            {"type": "http.response.body", "body": b"", "more_body": False},
        ]
    )
    guarded = GuardrailMiddleware(app, rules=RuleSet.from_rules(rules().rules), metrics=GuardMetrics(registry))
    await guarded(http_scope(), Receiver(), Recorder())
    settled = series(registry)

    short = replay_app(
        [
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]},
            {"type": "http.response.body", "body": b"".join(chunks.stream(["hi"])), "more_body": False},
        ]
    )
    guarded = GuardrailMiddleware(short, rules=RuleSet.from_rules(rules().rules), metrics=GuardMetrics(registry))
    for i in range(1000):
        body = f'{{"model": "model-{i}", "stream": true, "messages": []}}'.encode()
        await guarded(http_scope(f"/v1/tenant-{i}/chat/completions"), Receiver(body), Recorder())
    assert series(registry) == settled
