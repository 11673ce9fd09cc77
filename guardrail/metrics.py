"""Prometheus metrics: what the guard does to live traffic, and a ``/metrics`` ASGI app.

:class:`GuardMetrics` is the one object the middleware and the proxy report to. Its collectors
are created the first time it is built for a registry (the default ``prometheus_client``
registry unless one is injected) and shared by every later ``GuardMetrics`` on that registry,
so two middlewares or two apps in one process count into the same series. Nothing is
registered at import time.

Label values come only from closed sets: dialects, outcomes, actions and kinds outside the
sets below are counted as ``"other"``, so hostile or buggy input cannot grow the number of
series. Rule names come from the loaded rule files and are trusted as they are.

This is the only module that imports ``prometheus_client``; ``guardrail.core`` never does.

Serving the metrics
-------------------
One process::

    from starlette.routing import Route
    from guardrail.metrics import metrics_app

    app.router.routes.append(Route("/metrics", metrics_app()))

(``Route`` rather than ``Mount``: a ``Mount("/metrics")`` only matches ``/metrics/...``.)

Several worker processes
------------------------
Each worker process counts on its own. To scrape them as one, set ``PROMETHEUS_MULTIPROC_DIR``
to an empty directory before the server starts, in the environment of every worker:
``prometheus_client`` reads it when it is first imported and then keeps each process's values in
files there, which every scrape sums. Each scrape builds a fresh registry holding only a
``MultiProcessCollector``: a registry that also held this process's own collectors would export
them twice. Any worker can answer the scrape.

Empty the directory at every start: files left by an earlier run are summed in as if their
processes were still alive. With uvicorn::

    rm -rf /run/guardrail-metrics && mkdir -p /run/guardrail-metrics
    PROMETHEUS_MULTIPROC_DIR=/run/guardrail-metrics uvicorn myapp:app --workers 4

uvicorn has no hook for a worker that died, so a crashed worker's in-flight streams stay in
``guardrail_active_streams`` until the next restart. gunicorn has one; remove the dead worker's
``livesum`` gauge file there::

    # gunicorn.conf.py
    from prometheus_client import multiprocess

    def child_exit(server, worker):
        multiprocess.mark_process_dead(worker.pid)

    # then (same directory preparation as above):
    # gunicorn myapp:app -c gunicorn.conf.py -w 4 -k uvicorn_worker.UvicornWorker

In multiprocess mode a scrape exports what the processes wrote to the directory; the registry
given to :func:`metrics_app` is not read, and collectors that only live in one process's
registry (custom collectors, ``process_*`` metrics) are not exported.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Final

import anyio.to_thread
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from guardrail._asgi import send_response, serve_lifespan
from guardrail._types import ASGIApp, Receive, Scope, Send

__all__ = [
    "ACTIONS",
    "ANOMALY_KINDS",
    "DIALECTS",
    "OTHER",
    "OUTCOMES",
    "TOKEN_KINDS",
    "GuardMetrics",
    "metrics_app",
]

OTHER: Final = "other"
"""The label value every dialect, outcome, action or kind outside its closed set is counted as."""

# The closed label sets. Outcomes, actions and anomaly kinds mirror the enums in guardrail.core
# (a test checks they agree); dialects are the dialects' names. Strings are accepted, so callers
# may pass those enums or plain text alike.
DIALECTS: Final = (
    "openai_chat",
    "openai_completions",
    "openai_responses",
    "anthropic_messages",
    "ollama",
    "gemini",
    "vercel_ui",
    "text",
)
OUTCOMES: Final = ("completed", "aborted", "fallback", "timeout", "client_disconnected", "upstream_error")
ACTIONS: Final = ("abort", "fallback", "redact", "log")
TOKEN_KINDS: Final = ("prompt", "completion")
ANOMALY_KINDS: Final = (
    "malformed_event",
    "oversized_event",
    "unknown_event",
    "unterminated_event",
    "rule_error",
    "unreadable_response",
    "truncated_stream",
)

# Rule checks take tens of microseconds per delta; a pathological pattern is cut off by the
# regex timeout long before 50 ms.
CHECK_BUCKETS: Final = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05)
# Held text is usually released by the next delta (milliseconds); seconds mean a stalled upstream.
HOLDBACK_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# First tokens arrive in a fraction of a second to tens of seconds (reasoning models, queues).
FIRST_TOKEN_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
# Whole answers run from a second to several minutes.
DURATION_BUCKETS: Final = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

_MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

_DIALECT_SET: Final = frozenset(DIALECTS)
_ACTION_SET: Final = frozenset(ACTIONS)


@dataclass(frozen=True, slots=True)
class _Collectors:
    """Every collector guardrail exports, created once per registry."""

    streams: Counter
    streams_started: Counter
    interventions: Counter
    deltas: Counter
    tokens: Counter
    leaked_chars: Counter
    held_chars: Counter
    anomalies: Counter
    active_streams: Gauge
    check_seconds: Histogram
    holdback_seconds: Histogram
    first_token_seconds: Histogram
    stream_duration_seconds: Histogram

    @classmethod
    def create(cls) -> _Collectors:
        # Built unregistered, then registered one by one, so a clash can be undone cleanly.
        return cls(
            streams=Counter(
                "guardrail_streams_total",
                "Guarded streams that ended, by dialect and how they ended.",
                ["dialect", "outcome"],
                registry=None,
            ),
            streams_started=Counter(
                "guardrail_streams_started_total",
                "Guarded streams that started, by dialect.",
                ["dialect"],
                registry=None,
            ),
            interventions=Counter(
                "guardrail_interventions_total",
                "Times a rule fired, by rule and action (action log: shadow mode, the stream was not changed).",
                ["rule", "action"],
                registry=None,
            ),
            deltas=Counter(
                "guardrail_deltas_total",
                "Stream deltas checked against the rules, by dialect.",
                ["dialect"],
                registry=None,
            ),
            tokens=Counter("guardrail_tokens_total", "Tokens counted, by kind.", ["kind"], registry=None),
            leaked_chars=Counter(
                "guardrail_leaked_chars_total",
                "Characters of a match that had already reached the client when a holdback: false rule fired.",
                ["rule"],
                registry=None,
            ),
            held_chars=Counter(
                "guardrail_held_chars_total", "Characters held back before release to the client.", registry=None
            ),
            anomalies=Counter(
                "guardrail_anomalies_total", "Bad input the guard saw and dealt with, by kind.", ["kind"], registry=None
            ),
            active_streams=Gauge(
                "guardrail_active_streams",
                "Guarded streams in flight.",
                registry=None,
                # Sum over live processes only: a dead worker's in-flight streams are gone.
                multiprocess_mode="livesum",
            ),
            check_seconds=Histogram(
                "guardrail_check_seconds", "Rule evaluation time per delta.", buckets=CHECK_BUCKETS, registry=None
            ),
            holdback_seconds=Histogram(
                "guardrail_holdback_seconds",
                "How long held text waited before release, per release.",
                buckets=HOLDBACK_BUCKETS,
                registry=None,
            ),
            first_token_seconds=Histogram(
                "guardrail_time_to_first_token_seconds",
                "Time from the start of a stream to its first text delta.",
                buckets=FIRST_TOKEN_BUCKETS,
                registry=None,
            ),
            stream_duration_seconds=Histogram(
                "guardrail_stream_duration_seconds",
                "Time from the start of a stream to its end.",
                buckets=DURATION_BUCKETS,
                registry=None,
            ),
        )

    def register(self, registry: CollectorRegistry) -> None:
        done: list[Counter | Gauge | Histogram] = []
        try:
            for field in fields(self):
                collector = getattr(self, field.name)
                registry.register(collector)
                done.append(collector)
        except BaseException:
            # Leave the registry as it was, so a retry (or another library) is not blocked by half of ours.
            for collector in done:
                registry.unregister(collector)
            raise


# The collectors of each registry, so that every GuardMetrics on one registry shares them. Weak
# keys: a registry dropped by its owner (a test's, an app's) takes its collectors with it.
_shared: weakref.WeakKeyDictionary[CollectorRegistry, _Collectors] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def _collectors_for(registry: CollectorRegistry) -> _Collectors:
    with _shared_lock:
        collectors = _shared.get(registry)
        if collectors is None:
            collectors = _Collectors.create()
            collectors.register(registry)
            _shared[registry] = collectors
        return collectors


class _ClosedLabel:
    """Children of a counter whose last label takes values from a closed set; others count as ``other``.

    ``fixed`` are the values of the labels before it (the dialect, for outcomes).
    """

    __slots__ = ("_children", "_counter", "_fixed")

    def __init__(self, counter: Counter, allowed: tuple[str, ...], *fixed: str) -> None:
        self._counter = counter
        self._fixed = fixed
        # Created up front: the known series exist at 0 from the start, so rate() sees their first hit.
        self._children = {value: counter.labels(*fixed, value) for value in allowed}

    def child(self, value: str) -> Counter:
        child = self._children.get(value)
        # Not cached under the unknown value: that cache would grow with every new value.
        return child if child is not None else self._counter.labels(*self._fixed, OTHER)


class _DialectSeries:
    """One dialect's children, fetched once so that the per-delta path does no label lookup."""

    __slots__ = ("count_delta", "count_start", "outcomes")

    def __init__(self, collectors: _Collectors, dialect: str) -> None:
        self.count_delta = collectors.deltas.labels(dialect).inc
        self.count_start = collectors.streams_started.labels(dialect).inc
        self.outcomes = _ClosedLabel(collectors.streams, OUTCOMES, dialect)


class GuardMetrics:
    """The guard's Prometheus metrics: the one object the middleware and the proxy report to.

    Every ``GuardMetrics`` built on the same registry shares that registry's collectors, so a
    second middleware or app in the process costs little and never fails with "Duplicated
    timeseries". Dialects, outcomes, actions and kinds outside their closed sets (``DIALECTS``,
    ``OUTCOMES``, ``ACTIONS``, ``TOKEN_KINDS``, ``ANOMALY_KINDS``) are counted as ``"other"``;
    rule names are used as given, so pass only names from the loaded rule files.

    The methods may be called from any thread. The per-delta one, :meth:`delta`, does no label
    lookup: the children of each dialect are fetched once.
    """

    __slots__ = ("_anomalies", "_collectors", "_dialects", "_interventions", "_observe_check", "_tokens")

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Create the collectors in ``registry``, or reuse the ones an earlier ``GuardMetrics`` created there.

        Args:
            registry: where the metrics live; the default ``prometheus_client`` registry if None.

        Raises:
            ValueError: ``registry`` already holds a metric with one of guardrail's names that guardrail
                did not create. Nothing is left registered in that case.
        """
        collectors = _collectors_for(REGISTRY if registry is None else registry)
        self._collectors = collectors
        self._dialects: dict[str, _DialectSeries] = {}
        self._interventions: dict[tuple[str, str], tuple[Counter, Counter]] = {}
        self._tokens = _ClosedLabel(collectors.tokens, TOKEN_KINDS)
        self._anomalies = _ClosedLabel(collectors.anomalies, ANOMALY_KINDS)
        self._observe_check = collectors.check_seconds.observe

    def declare_rules(self, rules: Mapping[str, str]) -> None:
        """Start the loaded rules' series at 0, so dashboards show them before they first fire.

        Args:
            rules: each rule's name and its configured action.
        """
        for rule, action in rules.items():
            self._rule_children(rule, action)

    def stream_started(self, dialect: str) -> None:
        """Count a guarded stream that started.

        Args:
            dialect: the stream's dialect, such as ``"openai_chat"``.
        """
        self._dialect(dialect).count_start()
        self._collectors.active_streams.inc()

    def stream_finished(
        self, dialect: str, outcome: str, *, duration: float, time_to_first_token: float | None
    ) -> None:
        """Count a guarded stream that ended; call it once for every :meth:`stream_started`.

        Args:
            dialect: the stream's dialect.
            outcome: how it ended, an ``Outcome`` value such as ``"completed"`` or ``"aborted"``.
            duration: seconds from the start of the stream to its end.
            time_to_first_token: seconds from the start to the first text delta; None if none came.
        """
        self._dialect(dialect).outcomes.child(outcome).inc()
        collectors = self._collectors
        collectors.active_streams.dec()
        collectors.stream_duration_seconds.observe(duration)
        if time_to_first_token is not None:
            collectors.first_token_seconds.observe(time_to_first_token)

    def delta(self, dialect: str, check_seconds: float, count: int = 1, *, sampled: bool = True) -> None:
        """Count deltas checked against the rules.

        Args:
            dialect: the stream's dialect.
            check_seconds: how long the rules took on one delta (a sample of the ``count``).
            count: how many deltas.
            sampled: whether ``check_seconds`` is a real sample for ``guardrail_check_seconds``.
        """
        series = self._dialects.get(dialect)
        if series is None:
            series = self._dialect(dialect)
        series.count_delta(count)
        if sampled:
            self._observe_check(check_seconds)

    def intervention(self, rule: str, action: str, *, leaked_chars: int = 0) -> None:
        """Count a rule firing.

        Args:
            rule: the rule's name from the rule file.
            action: the action taken, an ``Action`` value (``"log"`` for a rule in shadow mode).
            leaked_chars: characters of the match that had already reached the client (only a
                ``holdback: false`` rule leaks).

        Raises:
            ValueError: ``leaked_chars`` is negative. Nothing is counted then.
        """
        if leaked_chars < 0:
            raise ValueError(f"leaked_chars must not be negative, got {leaked_chars}")
        fired, leaked = self._rule_children(rule, action)
        fired.inc()
        if leaked_chars:
            leaked.inc(leaked_chars)

    def held(self, chars: int, seconds: float) -> None:
        """Count held-back text released to the client.

        Args:
            chars: how many characters were released.
            seconds: how long the oldest of them had been held.

        Raises:
            ValueError: ``chars`` is negative. Nothing is counted then.
        """
        if chars < 0:
            raise ValueError(f"chars must not be negative, got {chars}")
        self._collectors.held_chars.inc(chars)
        self._collectors.holdback_seconds.observe(seconds)

    def tokens(self, kind: str, count: int) -> None:
        """Count tokens.

        Args:
            kind: ``"prompt"`` or ``"completion"``.
            count: how many.

        Raises:
            ValueError: ``count`` is negative.
        """
        self._tokens.child(kind).inc(count)

    def anomaly(self, kind: str) -> None:
        """Count bad input the guard saw and dealt with.

        Args:
            kind: an ``AnomalyKind`` value such as ``"malformed_event"``.
        """
        self._anomalies.child(kind).inc()

    def _dialect(self, dialect: str) -> _DialectSeries:
        # Keyed by known dialects and OTHER only, so the dict stays small whatever callers pass.
        key = dialect if dialect in _DIALECT_SET else OTHER
        series = self._dialects.get(key)
        if series is None:
            series = self._dialects[key] = _DialectSeries(self._collectors, key)
        return series

    def _rule_children(self, rule: str, action: str) -> tuple[Counter, Counter]:
        key = (rule, action if action in _ACTION_SET else OTHER)
        children = self._interventions.get(key)
        if children is None:
            children = self._interventions[key] = (
                self._collectors.interventions.labels(*key),
                self._collectors.leaked_chars.labels(rule),
            )
        return children


def metrics_app(registry: CollectorRegistry | None = None) -> ASGIApp:
    """An ASGI app that serves the metrics in the Prometheus text format.

    Route it at ``/metrics`` (see the module docstring, also for several worker processes).

    Args:
        registry: what to export; the default ``prometheus_client`` registry if None. When
            ``PROMETHEUS_MULTIPROC_DIR`` is set at scrape time, every scrape exports what all
            processes wrote to that directory instead, through a fresh registry.

    Returns:
        A pure ASGI app: ``GET`` gets the exposition, any other method gets 405. It answers
        lifespan events too, so it can run as the whole app of a metrics-only server.
    """
    return _MetricsApp(REGISTRY if registry is None else registry)


class _MetricsApp:
    __slots__ = ("_registry",)

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise ValueError(f"metrics_app serves HTTP, not {scope['type']!r}")
        if scope["method"] != "GET":
            await send_response(send, 405, b"Method Not Allowed\n", b"text/plain; charset=utf-8", [(b"allow", b"GET")])
            return
        # In a thread: a multiprocess scrape reads every worker's files, and the event loop is
        # busy carrying streams whose latency matters more than the scrape's.
        body = await anyio.to_thread.run_sync(self._render)
        await send_response(send, 200, body, CONTENT_TYPE_LATEST.encode("latin-1"))

    def _render(self) -> bytes:
        # Read per scrape, not at import: the server may set it after importing the app.
        directory = os.environ.get(_MULTIPROC_ENV)
        if not directory:
            return generate_latest(self._registry)
        registry = CollectorRegistry()
        # prometheus_client's multiprocess module has no annotations.
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
