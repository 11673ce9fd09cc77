"""GuardMetrics, the /metrics app (one process and several) and the example Grafana dashboard."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Route

from guardrail._types import ASGIApp, Message
from guardrail.metrics import (
    ACTIONS,
    ANOMALY_KINDS,
    OUTCOMES,
    TOKEN_KINDS,
    GuardMetrics,
    metrics_app,
)

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "examples" / "grafana-dashboard.json"
WORKER = Path(__file__).resolve().with_name("metrics_worker.py")

# The panels issue 5 asks the dashboard for, by the metric each one needs.
DASHBOARD_MUST_QUERY = {
    "guardrail_interventions_total",
    "guardrail_streams_total",
    "guardrail_leaked_chars_total",
    "guardrail_holdback_seconds_bucket",
    "guardrail_time_to_first_token_seconds_bucket",
    "guardrail_active_streams",
    "guardrail_deltas_total",
    "guardrail_check_seconds_bucket",
}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> GuardMetrics:
    return GuardMetrics(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def series(registry: CollectorRegistry, family: str) -> list[dict[str, str]]:
    """The label sets of every ``_total`` sample of one counter family."""
    return [
        sample.labels
        for metric in registry.collect()
        if metric.name == family
        for sample in metric.samples
        if sample.name.endswith("_total")
    ]


async def scrape(app: ASGIApp, method: str = "GET", path: str = "/metrics") -> httpx.Response:
    with anyio.fail_after(10):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_stream_lifecycle_counts_outcome_active_streams_and_latencies(
    metrics: GuardMetrics, registry: CollectorRegistry
) -> None:
    metrics.stream_started("openai_chat")
    metrics.stream_started("openai_chat")
    assert value(registry, "guardrail_active_streams") == 2
    assert value(registry, "guardrail_streams_started_total", dialect="openai_chat") == 2

    metrics.stream_finished("openai_chat", "completed", duration=1.5, time_to_first_token=0.2)
    metrics.stream_finished("openai_chat", "client_disconnected", duration=0.1, time_to_first_token=None)

    assert value(registry, "guardrail_active_streams") == 0
    assert value(registry, "guardrail_streams_total", dialect="openai_chat", outcome="completed") == 1
    assert value(registry, "guardrail_streams_total", dialect="openai_chat", outcome="client_disconnected") == 1
    assert value(registry, "guardrail_stream_duration_seconds_count") == 2
    assert value(registry, "guardrail_stream_duration_seconds_sum") == pytest.approx(1.6)
    assert value(registry, "guardrail_stream_duration_seconds_bucket", le="1.0") == 1
    # A stream that never produced text has no time to first token.
    assert value(registry, "guardrail_time_to_first_token_seconds_count") == 1
    assert value(registry, "guardrail_time_to_first_token_seconds_bucket", le="0.25") == 1


def test_every_outcome_of_a_dialect_starts_at_zero_once_the_dialect_is_seen(
    metrics: GuardMetrics, registry: CollectorRegistry
) -> None:
    assert series(registry, "guardrail_streams") == []
    metrics.stream_started("openai_chat")
    for outcome in OUTCOMES:
        assert value(registry, "guardrail_streams_total", dialect="openai_chat", outcome=outcome) == 0


def test_delta_counts_per_dialect_and_observes_check_time(metrics: GuardMetrics, registry: CollectorRegistry) -> None:
    for _ in range(3):
        metrics.delta("openai_chat", 2e-5)
    metrics.delta("anthropic_messages", 0.002)

    assert value(registry, "guardrail_deltas_total", dialect="openai_chat") == 3
    assert value(registry, "guardrail_deltas_total", dialect="anthropic_messages") == 1
    assert value(registry, "guardrail_check_seconds_count") == 4
    assert value(registry, "guardrail_check_seconds_bucket", le="2.5e-05") == 3
    assert value(registry, "guardrail_check_seconds_bucket", le="0.001") == 3
    assert value(registry, "guardrail_check_seconds_bucket", le="0.0025") == 4


def test_intervention_counts_rule_and_action_including_shadow_mode(
    metrics: GuardMetrics, registry: CollectorRegistry
) -> None:
    metrics.intervention("api-keys", "redact")
    metrics.intervention("api-keys", "redact")
    metrics.intervention("toxicity", "log")

    assert value(registry, "guardrail_interventions_total", rule="api-keys", action="redact") == 2
    assert value(registry, "guardrail_interventions_total", rule="toxicity", action="log") == 1
    # A rule that fired without leaking shows 0 leaked, not a missing series.
    assert value(registry, "guardrail_leaked_chars_total", rule="api-keys") == 0


def test_intervention_counts_leaked_chars(metrics: GuardMetrics, registry: CollectorRegistry) -> None:
    metrics.intervention("late-check", "abort", leaked_chars=7)
    metrics.intervention("late-check", "abort", leaked_chars=3)

    assert value(registry, "guardrail_leaked_chars_total", rule="late-check") == 10


def test_intervention_with_negative_leaked_chars_raises_and_counts_nothing(
    metrics: GuardMetrics, registry: CollectorRegistry
) -> None:
    with pytest.raises(ValueError, match="leaked_chars"):
        metrics.intervention("late-check", "abort", leaked_chars=-1)

    assert value(registry, "guardrail_interventions_total", rule="late-check", action="abort") is None


def test_declared_rules_start_at_zero(metrics: GuardMetrics, registry: CollectorRegistry) -> None:
    metrics.declare_rules({"api-keys": "redact", "toxicity": "log"})

    assert value(registry, "guardrail_interventions_total", rule="api-keys", action="redact") == 0
    assert value(registry, "guardrail_interventions_total", rule="toxicity", action="log") == 0
    assert value(registry, "guardrail_leaked_chars_total", rule="toxicity") == 0


def test_held_counts_chars_and_observes_wait(metrics: GuardMetrics, registry: CollectorRegistry) -> None:
    metrics.held(12, 0.004)
    metrics.held(3, 2.0)

    assert value(registry, "guardrail_held_chars_total") == 15
    assert value(registry, "guardrail_holdback_seconds_count") == 2
    assert value(registry, "guardrail_holdback_seconds_bucket", le="0.005") == 1


def test_held_with_negative_chars_raises_and_counts_nothing(metrics: GuardMetrics, registry: CollectorRegistry) -> None:
    with pytest.raises(ValueError, match="chars"):
        metrics.held(-1, 0.1)

    assert value(registry, "guardrail_holdback_seconds_count") == 0


def test_tokens_and_anomalies_count_by_kind_from_zero(metrics: GuardMetrics, registry: CollectorRegistry) -> None:
    for kind in TOKEN_KINDS:
        assert value(registry, "guardrail_tokens_total", kind=kind) == 0
    for kind in ANOMALY_KINDS:
        assert value(registry, "guardrail_anomalies_total", kind=kind) == 0

    metrics.tokens("prompt", 120)
    metrics.tokens("completion", 40)
    metrics.anomaly("malformed_event")

    assert value(registry, "guardrail_tokens_total", kind="prompt") == 120
    assert value(registry, "guardrail_tokens_total", kind="completion") == 40
    assert value(registry, "guardrail_anomalies_total", kind="malformed_event") == 1


def test_unknown_label_values_count_as_other_and_keep_series_bounded(
    metrics: GuardMetrics, registry: CollectorRegistry
) -> None:
    for i in range(1000):
        metrics.stream_started(f"dialect-{i}")
        metrics.delta(f"dialect-{i}", 1e-5)
        metrics.stream_finished(f"dialect-{i}", f"outcome-{i}", duration=1.0, time_to_first_token=None)
        metrics.stream_finished("openai_chat", f"outcome-{i}", duration=1.0, time_to_first_token=None)
        metrics.intervention("api-keys", f"action-{i}")
        metrics.tokens(f"kind-{i}", 1)
        metrics.anomaly(f"kind-{i}")

    # Known dialects and "other", each with the known outcomes and "other".
    assert len(series(registry, "guardrail_streams")) == 2 * (len(OUTCOMES) + 1)
    assert value(registry, "guardrail_streams_total", dialect="other", outcome="other") == 1000
    assert value(registry, "guardrail_streams_total", dialect="openai_chat", outcome="other") == 1000
    assert value(registry, "guardrail_deltas_total", dialect="other") == 1000
    assert sorted(labels["dialect"] for labels in series(registry, "guardrail_deltas")) == ["openai_chat", "other"]
    assert series(registry, "guardrail_interventions") == [{"rule": "api-keys", "action": "other"}]
    assert len(series(registry, "guardrail_tokens")) == len(TOKEN_KINDS) + 1
    assert len(series(registry, "guardrail_anomalies")) == len(ANOMALY_KINDS) + 1
    assert value(registry, "guardrail_anomalies_total", kind="other") == 1000


def test_enum_members_are_accepted_as_label_values(metrics: GuardMetrics, registry: CollectorRegistry) -> None:
    from guardrail.core.outputs import Outcome
    from guardrail.core.rule import Action

    metrics.stream_finished("openai_chat", Outcome.ABORTED, duration=1.0, time_to_first_token=None)
    metrics.intervention("api-keys", Action.REDACT)

    assert value(registry, "guardrail_streams_total", dialect="openai_chat", outcome="aborted") == 1
    assert value(registry, "guardrail_interventions_total", rule="api-keys", action="redact") == 1


def test_closed_label_sets_match_the_core_enums() -> None:
    from guardrail.core.outputs import AnomalyKind, Outcome
    from guardrail.core.rule import Action

    assert set(OUTCOMES) == {str(outcome) for outcome in Outcome}
    assert set(ACTIONS) == {str(action) for action in Action}
    assert set(ANOMALY_KINDS) == {str(kind) for kind in AnomalyKind}


def test_guard_metrics_on_one_registry_share_collectors(registry: CollectorRegistry) -> None:
    first = GuardMetrics(registry)
    second = GuardMetrics(registry)

    first.intervention("api-keys", "redact")
    second.intervention("api-keys", "redact")
    first.stream_started("openai_chat")
    second.stream_finished("openai_chat", "completed", duration=1.0, time_to_first_token=0.1)

    assert value(registry, "guardrail_interventions_total", rule="api-keys", action="redact") == 2
    assert value(registry, "guardrail_active_streams") == 0


def test_guard_metrics_on_separate_registries_are_independent() -> None:
    one, two = CollectorRegistry(), CollectorRegistry()
    GuardMetrics(one).anomaly("rule_error")
    GuardMetrics(two)

    assert value(one, "guardrail_anomalies_total", kind="rule_error") == 1
    assert value(two, "guardrail_anomalies_total", kind="rule_error") == 0


def test_name_clash_raises_and_leaves_the_registry_as_it_was(registry: CollectorRegistry) -> None:
    foreign = Counter("guardrail_anomalies", "Someone else's.", registry=registry)

    with pytest.raises(ValueError):
        GuardMetrics(registry)

    assert [metric.name for metric in registry.collect()] == ["guardrail_anomalies"]
    registry.unregister(foreign)
    GuardMetrics(registry).anomaly("rule_error")
    assert value(registry, "guardrail_anomalies_total", kind="rule_error") == 1


def test_default_registry_is_used_when_none_is_given() -> None:
    # The default registry is shared with the rest of the session: compare before and after.
    before = REGISTRY.get_sample_value("guardrail_anomalies_total", {"kind": "oversized_event"}) or 0.0

    GuardMetrics().anomaly("oversized_event")
    GuardMetrics().anomaly("oversized_event")

    assert REGISTRY.get_sample_value("guardrail_anomalies_total", {"kind": "oversized_event"}) == before + 2


def test_import_registers_nothing() -> None:
    code = (
        "import guardrail.metrics\n"
        "from prometheus_client import REGISTRY\n"
        "print(sorted(m.name for m in REGISTRY.collect() if m.name.startswith('guardrail')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.anyio
async def test_metrics_app_serves_the_exposition(metrics: GuardMetrics, registry: CollectorRegistry) -> None:
    metrics.stream_started("openai_chat")
    metrics.stream_finished("openai_chat", "completed", duration=1.0, time_to_first_token=0.1)

    response = await scrape(metrics_app(registry))

    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    scraped = samples(response.text)
    assert scraped["guardrail_streams_total", frozenset({("dialect", "openai_chat"), ("outcome", "completed")})] == 1
    assert scraped["guardrail_active_streams", frozenset()] == 0


@pytest.mark.anyio
async def test_metrics_app_serves_the_default_registry_when_none_is_given() -> None:
    GuardMetrics()

    response = await scrape(metrics_app())

    assert response.status_code == 200
    assert "guardrail_active_streams" in response.text


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD"])
async def test_metrics_app_refuses_methods_other_than_get(registry: CollectorRegistry, method: str) -> None:
    response = await scrape(metrics_app(registry), method)

    assert response.status_code == 405
    assert response.headers["allow"] == "GET"


@pytest.mark.anyio
async def test_metrics_app_works_as_a_starlette_route(metrics: GuardMetrics, registry: CollectorRegistry) -> None:
    metrics.anomaly("unknown_event")
    app = Starlette(routes=[Route("/metrics", metrics_app(registry))])

    response = await scrape(app)

    assert response.status_code == 200
    assert 'guardrail_anomalies_total{kind="unknown_event"} 1.0' in response.text


@pytest.mark.anyio
async def test_metrics_app_answers_lifespan(registry: CollectorRegistry) -> None:
    incoming: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(10):
        await metrics_app(registry)({"type": "lifespan"}, receive, send)

    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


@pytest.mark.anyio
async def test_metrics_app_refuses_websockets(registry: CollectorRegistry) -> None:
    async def receive() -> Message:
        raise AssertionError("not reached")

    async def send(message: Message) -> None:
        raise AssertionError("not reached")

    with pytest.raises(ValueError, match="websocket"):
        await metrics_app(registry)({"type": "websocket"}, receive, send)


@pytest.fixture
def multiproc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    # Only the scrape in this process sees the variable; this process creates no metric values
    # (prometheus_client fixed its value class when it was imported, without it).
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    yield directory


def run_workers(directory: Path, *jobs: tuple[int, int]) -> list[int]:
    """Run one worker process per (streams, still open) job, all at once; return their pids."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(streams), str(still_open)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for streams, still_open in jobs
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 0, stderr
    return [worker.pid for worker in workers]


@pytest.mark.anyio
async def test_one_scrape_sums_worker_processes(multiproc_dir: Path) -> None:
    pids = run_workers(multiproc_dir, (3, 1), (5, 2))

    # The registry given is not read in multiprocess mode: the scrape reads the workers' files.
    response = await scrape(metrics_app(CollectorRegistry()))

    assert response.status_code == 200
    scraped = samples(response.text)
    chat = ("dialect", "openai_chat")
    assert scraped["guardrail_streams_total", frozenset({chat, ("outcome", "completed")})] == 8
    assert scraped["guardrail_streams_started_total", frozenset({chat})] == 11
    assert scraped["guardrail_deltas_total", frozenset({chat})] == 8
    assert scraped["guardrail_interventions_total", frozenset({("rule", "api-keys"), ("action", "redact")})] == 8
    assert scraped["guardrail_stream_duration_seconds_count", frozenset()] == 8
    assert scraped["guardrail_check_seconds_bucket", frozenset({("le", "2.5e-05")})] == 8
    assert scraped["guardrail_active_streams", frozenset()] == 3

    # What gunicorn's child_exit hook does: a dead worker's streams are no longer in flight.
    for pid in pids:
        mark_process_dead(pid, str(multiproc_dir))  # type: ignore[no-untyped-call]  # the module has no annotations
    scraped = samples((await scrape(metrics_app())).text)
    assert scraped.get(("guardrail_active_streams", frozenset()), 0) == 0
    assert scraped["guardrail_streams_total", frozenset({chat, ("outcome", "completed")})] == 8


def dashboard_queries(dashboard: dict[str, object]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and query variables."""
    panels = dashboard["panels"]
    templating = dashboard["templating"]
    assert isinstance(panels, list)
    assert isinstance(templating, dict)
    queries = [target["expr"] for panel in panels for target in panel["targets"]]
    for variable in templating["list"]:
        query = variable["query"]
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def exported_names(registry: CollectorRegistry) -> set[str]:
    """The sample names a scrape of ``registry`` can show, series with labels included before they exist."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {metric.name + suffix for metric in registry.collect() for suffix in suffixes[metric.type]}


def test_dashboard_is_valid_and_queries_only_exported_metrics(registry: CollectorRegistry) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    GuardMetrics(registry)
    exported = exported_names(registry)

    queried = {name for query in dashboard_queries(dashboard) for name in re.findall(r"guardrail_[a-z_]+", query)}

    assert queried - exported == set()
    assert DASHBOARD_MUST_QUERY - queried == set()
    assert [entry["name"] for entry in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert all(panel["datasource"]["uid"] == "${DS_PROMETHEUS}" for panel in dashboard["panels"])
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
