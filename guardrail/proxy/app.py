"""``guardrail serve``: the OpenAI-compatible guarding proxy as one ASGI app, and how to run it.

Routes of :class:`GuardingProxy`:

=========================  =================================================================
a dialect's endpoint       forwarded to the upstream (or the demo model), guarded by the rules
                           (``/v1/chat/completions``, ``/v1/responses``, ``/v1/messages``...:
                           see :data:`~guardrail.core.dialects.ENDPOINTS`)
text-free endpoints        forwarded unguarded: models lists and embeddings (:data:`TEXT_FREE`)
``--pass-through`` globs   forwarded unguarded, on the operator's say-so
other ``/v1``, ``/api``    refused (403, ``endpoint_not_guarded``): the guard cannot read them
``/metrics``               Prometheus metrics (see :mod:`guardrail.metrics`)
``/healthz``               ``{"status":"ok"}`` while the process serves (liveness)
``/readyz``                ``{"status":"ok"}`` when the upstream answers HTTP at all, else a 503
                           saying why (readiness; the demo model is always ready)
=========================  =================================================================

Every path is resolved first (see :mod:`guardrail.asgi.paths`): the proxy routes, guards and
forwards the resolved path, so ``/v1/./chat/completions`` is guarded like the real one and
reaches the upstream spelled the same way; a path that cannot be resolved safely is refused
with a 400.

The rules are reloaded while the proxy runs (see :mod:`guardrail.proxy.reload`); the reload
watcher and the upstream client live in the app's lifespan, so serve it with lifespan on.

Several worker processes
------------------------
uvicorn starts each worker from an import string, so ``guardrail serve --workers N`` passes its
settings in environment variables that :func:`create_app` (``guardrail.proxy.app:create_app``,
a factory) reads in every worker:

* ``GUARDRAIL_RULES``: the rule files, separated by ``os.pathsep`` (``:`` on Unix);
* ``GUARDRAIL_UPSTREAM``: the upstream base URL; unset or empty for the demo model;
* ``GUARDRAIL_PASS_THROUGH``: path globs forwarded unguarded, separated by ``os.pathsep``;
* ``GUARDRAIL_RECORD``: a directory to record the model's answers in (see :mod:`guardrail.proxy.record`).

The same factory serves under any ASGI server, e.g.
``GUARDRAIL_RULES=rules/default.yaml uvicorn --factory guardrail.proxy.app:create_app``. It
assumes the process is the proxy's own: once started, the proxy freezes the objects of startup
out of the garbage collector's sight (``gc.freeze()``, see ``build_app``).
Each worker counts its own metrics: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory
before starting for ``/metrics`` to sum all workers (guardrail never creates or empties it).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fnmatch
import gc
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio
from prometheus_client import CollectorRegistry

from guardrail._asgi import openai_error, send_json
from guardrail._types import ASGIApp, Receive, Scope, Send
from guardrail.asgi.branch import CREDENTIAL_ORIGINS_KEY, display_url, origin_of
from guardrail.asgi.paths import canonical_path
from guardrail.config import RuleSet, load_rules
from guardrail.core.dialects import dialect_for_path, endpoint_path
from guardrail.exceptions import ListenError
from guardrail.metrics import GuardMetrics, metrics_app
from guardrail.packs import DEFAULT_PACK
from guardrail.proxy.demo import DemoModel
from guardrail.proxy.record import StreamRecorder
from guardrail.proxy.reload import DEFAULT_POLL_SECONDS, ReloadingGuard
from guardrail.proxy.upstream import UpstreamProxy

logger = logging.getLogger(__name__)

# Characters a resolved path keeps as they are when it is written back as a raw path.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"

ENV_RULES = "GUARDRAIL_RULES"
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How long in-flight streams may take to finish once the server is asked to stop.
GRACEFUL_SHUTDOWN_SECONDS = 10.0
ENV_UPSTREAM = "GUARDRAIL_UPSTREAM"
ENV_PASS_THROUGH = "GUARDRAIL_PASS_THROUGH"
ENV_RECORD = "GUARDRAIL_RECORD"
# uvicorn's own default listen backlog: connections the kernel queues before the server accepts them.
LISTEN_BACKLOG = 2048
# With --workers, uvicorn's supervisor kills a worker that does not answer its ping within this
# long and starts another ("Child process died"). A worker answers only once it has imported its
# code, which took 6-10 s with cold caches on a busy 2-core machine: uvicorn's default of 5 s
# killed sound workers at start. A hung worker is still replaced, after this long.
WORKER_HEALTHCHECK_SECONDS = 30
CHAT_PATH = "/v1/chat/completions"
# The API prefixes the proxy serves: under them, a path is guarded, known text-free, passed on
# the operator's say-so, or refused.
API_PREFIXES = ("/v1/", "/v1beta/", "/api/")
# Endpoints whose answers carry no model text: forwarded unguarded (method, path glob).
TEXT_FREE = (
    ("GET", "/v1/models"),
    ("GET", "/v1/models/*"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/messages/count_tokens"),
    ("GET", "/api/tags"),
    ("GET", "/api/version"),
    ("POST", "/api/embed"),
    ("POST", "/api/embeddings"),
    ("GET", "/v1beta/models"),
    ("GET", "/v1beta/models/*"),
    ("POST", "/v1*/models/*:counttokens"),
    ("POST", "/v1*/models/*:embedcontent"),
    ("POST", "/v1*/models/*:batchembedcontents"),
)


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """What ``guardrail serve`` serves.

    Attributes:
        rules: the rule files.
        upstream: the upstream base URL (e.g. ``https://api.openai.com/v1``); None for the
            built-in demo model.
        pass_through: path globs forwarded unguarded.
        record: a directory to record the model's answers in, before any rule sees them.
        default_rules: ``rules`` is the packaged default pack, taken because no rule file was
            given (the log says so).
    """

    rules: tuple[str, ...]
    upstream: str | None = None
    pass_through: tuple[str, ...] = ()
    record: str | None = None
    default_rules: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeSettings:
        """Read the settings from the ``GUARDRAIL_*`` variables (see the module docstring).

        Args:
            environ: the environment; ``os.environ`` if None.

        Returns:
            The settings.

        Raises:
            ValueError: ``GUARDRAIL_RULES`` is unset or empty.
        """
        env = os.environ if environ is None else environ
        rules = tuple(path for path in env.get(ENV_RULES, "").split(os.pathsep) if path)
        if not rules:
            raise ValueError(f"{ENV_RULES} must name at least one rule file (several separated by {os.pathsep!r})")
        passed = tuple(glob for glob in env.get(ENV_PASS_THROUGH, "").split(os.pathsep) if glob)
        return cls(rules, env.get(ENV_UPSTREAM) or None, passed, env.get(ENV_RECORD) or None)

    def to_env(self) -> dict[str, str]:
        """The environment variables :meth:`from_env` reads back into these settings."""
        return {
            ENV_RULES: os.pathsep.join(self.rules),
            ENV_UPSTREAM: self.upstream or "",
            ENV_PASS_THROUGH: os.pathsep.join(self.pass_through),
            ENV_RECORD: self.record or "",
        }

    def describe_model(self) -> str:
        """What answers, for the log: the upstream without credentials, or the demo model."""
        return f"upstream {display_url(self.upstream)}" if self.upstream else "the built-in demo model"

    def describe_rules(self) -> str:
        """Which rules, for the log: the files, or the packaged default pack and how to see it."""
        if self.default_rules:
            return (
                f"the packaged default rules ({', '.join(self.rules)}; no --rules was given): "
                f"`guardrail rules show {DEFAULT_PACK}` prints them"
            )
        return "rules from " + ", ".join(self.rules)


class GuardingProxy:
    """The ``guardrail serve`` ASGI app: routes, the guarded model app, metrics and health.

    Build it with :func:`build_app` or :func:`create_app`.
    """

    def __init__(
        self,
        settings: ServeSettings,
        guard: ReloadingGuard,
        model: ASGIApp,
        metrics: ASGIApp,
        *,
        owns_model: bool,
        freeze_after_startup: bool = False,
    ) -> None:
        self.settings = settings
        self.guard = guard
        self.model = model
        self.metrics = metrics
        self._owns_model = owns_model
        self.freezes_after_startup = freeze_after_startup
        origin = origin_of(settings.upstream) if settings.upstream else None
        # The upstream already receives the client's credentials: a url fallback there may too.
        self._credential_origins = (origin,) if origin else ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})
        elif scope["type"] == "http":
            await self._route(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = canonical_path(scope.get("path", ""), scope.get("raw_path"))
        if path is None:
            message = (
                "This request path cannot be read safely (encoded slashes, NUL, '..' above the root, or too long)."
            )
            await send_json(send, 400, openai_error(message, type="invalid_request_error", code="invalid_path"))
            return
        method = str(scope.get("method", "GET")).upper()
        lowered = path.lower()
        # From here on the app, the guard and the upstream see the resolved path, and only it.
        scope = {**scope, "path": path, "raw_path": quote(path, safe=_PATH_SAFE).encode("ascii"), "root_path": ""}
        if dialect_for_path(lowered) is not None and lowered.startswith(API_PREFIXES):
            endpoint = endpoint_path(path)  # one spelling for the rules, the guard and the upstream
            scope = {**scope, "path": endpoint, "raw_path": quote(endpoint, safe=_PATH_SAFE).encode("ascii")}
            if not self.guard.rules.rules_for(endpoint) and not self._passed(endpoint):
                await self._refuse(send, method, path, "the rule files do not guard it (their `paths`)")
                return
            await self.guard({**scope, CREDENTIAL_ORIGINS_KEY: self._credential_origins}, receive, send)
        elif lowered.startswith(API_PREFIXES):
            if self._passed(path) or any(method == m and fnmatch.fnmatchcase(lowered, g) for m, g in TEXT_FREE):
                await self.model(scope, receive, send)
            else:
                await self._refuse(send, method, path, "guardrail cannot read its answers")
        elif path == "/metrics":
            await self.metrics(scope, receive, send)
        elif path == "/healthz":
            await send_json(send, 200, {"status": "ok"})
        elif path == "/readyz":
            await self._readiness(send)
        else:
            await send_json(send, 404, openai_error(f"Not found: {path}", type="invalid_request_error", code=None))

    async def _readiness(self, send: Send) -> None:
        problem = await self.model.probe() if isinstance(self.model, UpstreamProxy) else None
        if problem is None:
            await send_json(send, 200, {"status": "ok"})
        else:
            await send_json(send, 503, {"status": "unavailable", "upstream": problem})

    def _passed(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, glob) for glob in self.settings.pass_through)

    async def _refuse(self, send: Send, method: str, path: str, why: str) -> None:
        message = (
            f"{method} {path} is not forwarded: {why}. An operator can forward it unguarded on purpose "
            f"with --pass-through '{path}' (GUARDRAIL_PASS_THROUGH)."
        )
        logger.warning("refused %s %s: %s", method, path, why)
        error = openai_error(message, type="invalid_request_error", code="endpoint_not_guarded")
        await send_json(send, 403, error, [(b"x-should-retry", b"false")])

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        async with anyio.create_task_group() as tasks:
            await tasks.start(self.guard.watch)
            if self.freezes_after_startup:
                _freeze_startup_objects()
            await send({"type": "lifespan.startup.complete"})
            while (await receive())["type"] != "lifespan.shutdown":
                pass
            tasks.cancel_scope.cancel()
        if self._owns_model and isinstance(self.model, UpstreamProxy):
            await self.model.aclose()
        await send({"type": "lifespan.shutdown.complete"})


def build_app(
    settings: ServeSettings,
    *,
    rules: RuleSet | None = None,
    registry: CollectorRegistry | None = None,
    model: ASGIApp | None = None,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    freeze_after_startup: bool = False,
) -> GuardingProxy:
    """Build the guarding proxy.

    Args:
        settings: the rule files and the upstream.
        rules: the rule files' rules if already loaded (they are loaded otherwise).
        registry: the Prometheus registry to count into and export; the default one if None.
        model: the app that answers instead of the upstream or demo model (tests, embedding);
            it is not closed at shutdown.
        poll_seconds: how often rule files are checked for changes.
        freeze_after_startup: once the app has started, move every object the process holds
            then out of the garbage collector's sight (``gc.freeze()``), for a process that
            serves nothing else: see :func:`_freeze_startup_objects`.

    Returns:
        The ASGI app.

    Raises:
        ConfigError: a rule file is invalid.
        ValueError: the upstream is not an absolute http(s) URL.
    """
    owns_model = model is None
    if model is None:
        model = UpstreamProxy(settings.upstream) if settings.upstream else DemoModel()
    metrics = GuardMetrics(registry)
    guarded = StreamRecorder(model, settings.record) if settings.record else model
    guard = ReloadingGuard(guarded, paths=settings.rules, metrics=metrics, rules=rules, poll_seconds=poll_seconds)
    return GuardingProxy(
        settings, guard, model, metrics_app(registry), owns_model=owns_model, freeze_after_startup=freeze_after_startup
    )


def _freeze_startup_objects() -> None:
    """Keep the objects of startup (modules, the app, the rules) out of every later collection.

    They live as long as the process, but a full collection walks all of them each time, some
    40,000 objects after the imports: a pause of tens of milliseconds in which no stream moves.
    Frozen, a full collection walks only what the streams themselves keep.
    """
    gc.collect()
    gc.freeze()


def create_app() -> GuardingProxy:
    """The proxy, configured from ``GUARDRAIL_RULES`` and ``GUARDRAIL_UPSTREAM``: a factory for uvicorn.

    The process is taken to be the proxy's own: the objects of startup are frozen once it has
    started (``freeze_after_startup`` of :func:`build_app`).

    Returns:
        The ASGI app.

    Raises:
        ValueError: ``GUARDRAIL_RULES`` is unset, or the upstream is not an http(s) URL.
        ConfigError: a rule file is invalid.
    """
    return build_app(ServeSettings.from_env(), freeze_after_startup=True)


def run(settings: ServeSettings, *, host: str, port: int, workers: int = 1, log_level: str = "info") -> None:
    """Serve the proxy with uvicorn until interrupted (Ctrl+C or SIGTERM).

    Args:
        settings: the rule files and the upstream; checked before anything is bound.
        host: the interface to listen on.
        port: the port; 0 picks a free one (the log says which).
        workers: worker processes; above 1 each starts from :func:`create_app` with ``settings``
            in the environment (see the module docstring).
        log_level: ``debug``, ``info``, ``warning`` or ``error``, for uvicorn's and guardrail's logs.

    Raises:
        ConfigError: a rule file is invalid.
        ValueError: the upstream is not an http(s) URL, or ``PROMETHEUS_MULTIPROC_DIR`` is not a directory.
        ListenError: the host and port cannot be listened on (the port is taken, say).
        SystemExit: the server could not start: uvicorn logs why.
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    rules = load_rules(settings.rules)  # fails before binding, with every problem listed
    if settings.upstream is not None and origin_of(settings.upstream) is None:
        raise ValueError(f"--upstream must be an absolute http(s) URL, got {display_url(settings.upstream)!r}")
    # Listening before anything is said: until uvicorn starts serving, the kernel queues
    # connections instead of refusing them.
    sock = listen(host, port)
    proxying = settings.upstream is not None
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "lifespan": "on",
        "log_config": _log_config(log_level),
        "log_level": log_level,
        # The upstream's own `server` and `date` headers pass through; uvicorn's would duplicate them.
        "server_header": not proxying,
        "date_header": not proxying,
        # A stalled stream must not hold a Ctrl+C for minutes; in-flight streams get this long to end.
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
    }
    with sock:
        if workers > 1:
            os.environ.update(settings.to_env())  # read back by create_app in every worker
            config = uvicorn.Config(
                "guardrail.proxy.app:create_app",
                factory=True,
                workers=workers,
                timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS,
                **options,
            )
        else:
            config = uvicorn.Config(build_app(settings, rules=rules, freeze_after_startup=True), **options)
        # The first line (uvicorn's Config has set up logging by now): what is guarded, and by what.
        logger.info("guarding %s with %s", settings.describe_model(), settings.describe_rules())
        if settings.record:
            logger.warning(
                "recording every answer of the model to %s as it arrives, before any rule sees it: "
                "these files hold model text (request headers are never written)",
                settings.record,
            )
        if workers > 1:
            _check_multiprocess_metrics(workers)
        where = f"[{host}]" if ":" in host else host
        logger.info("listening on http://%s:%d (Ctrl+C to stop)", where, sock.getsockname()[1])
        if workers > 1:
            Multiprocess(config, sockets=[sock]).run()
            return
        server = uvicorn.Server(config)
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl+C it shut down for
            server.run(sockets=[sock])
        if not server.started:
            raise SystemExit(1)


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host`` and ``port``, ready to hand to uvicorn (and its workers).

    Args:
        host: an interface address or host name.
        port: the port; 0 picks a free one.

    Returns:
        The listening socket.

    Raises:
        ListenError: the port is taken, or the host or port cannot be used; the message says
            what to do.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(_why_not_listening(host, port, exc)) from None
    sock.set_inheritable(True)  # worker processes serve it too
    return sock


def _why_not_listening(host: str, port: int, exc: OSError) -> str:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    other_port = port + 1 if 0 < port < 65535 else 8000
    elsewhere = f"choose another port: `make run PORT={other_port}`, or `guardrail serve --port {other_port}`"
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: port {port} is already in use (by another server?); stop it, or {elsewhere}"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: no permission to use port {port} (ports below 1024 need it); {elsewhere}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: {host} is not an address of this machine; try `--host 127.0.0.1`"
    return f"cannot listen on {where}: {exc.strerror or exc}"


def _check_multiprocess_metrics(workers: int) -> None:
    directory = os.environ.get(_MULTIPROC_ENV)
    if not directory:
        logger.warning(
            "%d workers count their metrics separately: each scrape of /metrics shows one worker's. "
            "Set %s to an empty directory to sum them.",
            workers,
            _MULTIPROC_ENV,
        )
        return
    if not os.path.isdir(directory):
        raise ValueError(f"{_MULTIPROC_ENV}={directory!r} is not a directory; create it (empty) first")
    if os.listdir(directory):
        logger.warning(
            "%s=%s is not empty: values left by an earlier run are summed in; empty it before each start",
            _MULTIPROC_ENV,
            directory,
        )


def _log_config(level: str) -> dict[str, Any]:
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    # Worker processes configure logging from this dict, so guardrail's loggers must be in it.
    config["formatters"]["guardrail"] = {
        "()": "uvicorn.logging.DefaultFormatter",
        "fmt": "%(levelprefix)s %(name)s: %(message)s",
        "use_colors": None,
    }
    config["handlers"]["guardrail"] = {
        "formatter": "guardrail",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    config["loggers"]["guardrail"] = {"handlers": ["guardrail"], "level": level.upper(), "propagate": False}
    config.setdefault("filters", {})["credentials"] = {"()": "guardrail.proxy.app.MaskCredentials"}
    config["handlers"]["access"]["filters"] = ["credentials"]
    return config


# Query parameters that carry credentials (Azure's api-key, Google's key, signed URLs' sig...).
_CREDENTIAL_QUERY = re.compile(
    r"(?i)([?&;](?:key|api[-_]?key|x-api-key|token|access[-_]?token|id[-_]?token|refresh[-_]?token|auth"
    r"|authorization|sig|signature|secret|client[-_]?secret|password|passwd|code)=)[^&;#\s]*"
)


class MaskCredentials(logging.Filter):
    """Masks credential query parameters in access log lines: ``?api-key=***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(
                _CREDENTIAL_QUERY.sub(r"\1***", arg) if isinstance(arg, str) and "=" in arg else arg
                for arg in record.args
            )
        return True
