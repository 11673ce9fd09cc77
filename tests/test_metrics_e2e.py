"""Metrics as an operator sees them: every metric the README lists, scraped over a real socket
after real streams, and series that stay bounded."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from guardrail import Action, BannedPatterns, BoundRule, GuardrailMiddleware, RuleSet
from guardrail.asgi.record import StreamRecord
from guardrail.metrics import GuardMetrics, metrics_app
from tests.apps import CHAT_PATH, ChatChunks, Receiver, Recorder, http_scope, joined_content, replay_app, split_events
from tests.servers import serve_in_thread

DOCUMENTED_METRICS = (
    "guardrail_streams_total",
    "guardrail_interventions_total",
    "guardrail_deltas_total",
    "guardrail_tokens_total",
    "guardrail_active_streams",
    "guardrail_check_seconds",
    "guardrail_holdback_seconds",
    "guardrail_time_to_first_token_seconds",
    "guardrail_stream_duration_seconds",
    "guardrail_leaked_chars_total",
)

KEY = "sk-" + "Q7w8E9r0T1y2U3i4O5p6A7s8"
# 40 deltas; several end in a possible match start ("s", "project") and are held for one delta.
CLEAN = [f"Word {n} is s" if n % 5 == 0 else f"word {n} is plain " for n in range(40)]
ANSWERS = {
    "clean": CLEAN,
    "redact": ["Your key: ", KEY[:9], KEY[9:], " keep it."],
    # The match is decided on the last delta, which brings it whole: every delta sent is checked.
    "abort": ["Some text, ", "more text, ", "and then the project starlight plan, told in full."],
    # A rule without hold-back releases "open " before "sesame" arrives: 5 characters leak.
    "leak": ["Say open ", "sesame and then more."],
}
SENT_DELTAS = sum(len(deltas) for deltas in ANSWERS.values())


def rules() -> RuleSet:
    return RuleSet.from_rules(
        [
            BoundRule("keys", BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"]), Action.REDACT),
            BoundRule("codenames", BannedPatterns(phrases=["project starlight"]), Action.ABORT),
            BoundRule("late", BannedPatterns(phrases=["open sesame"]), Action.ABORT, holdback=False),
        ],
        paths=[CHAT_PATH],
    )


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base_url: str) -> Samples:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


def test_every_documented_metric_is_exported_and_moves_with_real_streams() -> None:
    registry = CollectorRegistry()
    chunks = ChatChunks()

    async def completions(request: Request) -> StreamingResponse:
        kind = (await request.json())["kind"]

        async def body() -> AsyncIterator[bytes]:
            for part in chunks.stream(ANSWERS[kind]):
                await anyio.sleep(0.001)
                yield part

        return StreamingResponse(body(), media_type="text/event-stream")

    app = Starlette(
        routes=[Route(CHAT_PATH, completions, methods=["POST"]), Route("/metrics", metrics_app(registry))],
        middleware=[Middleware(GuardrailMiddleware, rules=rules(), metrics=GuardMetrics(registry))],
    )
    # Prompt tokens are counted when a rule or the client needs them: this client asks for usage.
    request = {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Tell me everything."}],
    }
    received: dict[str, str] = {}
    with serve_in_thread(app) as base_url:
        before = scrape(base_url)
        with httpx.Client(base_url=base_url, timeout=10) as client:
            for kind in ANSWERS:
                response = client.post(CHAT_PATH, json={**request, "kind": kind})
                response.raise_for_status()
                received[kind] = joined_content(split_events(response.content))
        # A stream is counted as its response ends, which the client may see first.
        deadline = time.monotonic() + 10
        after = scrape(base_url)
        while total(after, "guardrail_streams_total") - total(before, "guardrail_streams_total") < len(ANSWERS):
            assert time.monotonic() < deadline, "the streams were not counted"
            time.sleep(0.01)
            after = scrape(base_url)

    assert received == {
        "clean": "".join(CLEAN),
        "redact": "Your key: [redacted] keep it.",
        "abort": "Some text, more text, and then the ",
        "leak": "Say open ",
    }
    exported = {name for name, _ in after}
    for name in DOCUMENTED_METRICS:
        assert any(sample == name or sample.startswith(name + "_") for sample in exported), name

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("guardrail_streams_total") == len(ANSWERS)
    assert grew("guardrail_streams_total", outcome="completed") == 2
    assert grew("guardrail_streams_total", outcome="aborted") == 2
    assert grew("guardrail_interventions_total", rule="keys", action="redact") == 1
    assert grew("guardrail_interventions_total", rule="codenames", action="abort") == 1
    assert grew("guardrail_interventions_total", rule="late", action="abort") == 1
    assert total(after, "guardrail_active_streams") == 0
    assert grew("guardrail_leaked_chars_total", rule="keys") == 0
    assert grew("guardrail_leaked_chars_total", rule="codenames") == 0
    assert grew("guardrail_leaked_chars_total", rule="late") == len("open ")
    assert grew("guardrail_tokens_total", kind="prompt") > 0
    assert grew("guardrail_tokens_total", kind="completion") > 0
    # A 40-delta stream is sampled at least twice (one delta in 16).
    assert grew("guardrail_check_seconds_count") >= 2
    # Text was held (and released) in the clean and redact streams.
    assert grew("guardrail_holdback_seconds_count") >= 1
    assert grew("guardrail_time_to_first_token_seconds_count") == len(ANSWERS)
    assert grew("guardrail_stream_duration_seconds_count") == len(ANSWERS)
    # Every delta the rules checked is counted, the ones that tripped a rule too.
    assert grew("guardrail_deltas_total", dialect="openai_chat") == SENT_DELTAS


@pytest.mark.anyio
async def test_the_delta_that_trips_an_abort_is_counted_like_every_delta_the_guard_checked() -> None:
    registry = CollectorRegistry()
    records: list[StreamRecord] = []
    deltas = ANSWERS["abort"]
    app = replay_app(
        [
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]},
            *({"type": "http.response.body", "body": part, "more_body": True} for part in ChatChunks().stream(deltas)),
            {"type": "http.response.body", "body": b"", "more_body": False},
        ]
    )
    guarded = GuardrailMiddleware(app, rules=rules(), metrics=GuardMetrics(registry), on_record=records.append)
    recorder = Recorder()
    await guarded(http_scope(), Receiver(), recorder)
    assert recorder.content == "Some text, more text, and then the "
    (record,) = records
    # The app sent three deltas and the rules checked all three: the third one tripped the rule.
    assert record.deltas == len(deltas)
    assert registry.get_sample_value("guardrail_deltas_total", {"dialect": "openai_chat"}) == len(deltas)


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
