"""GuardrailMiddleware: pure ASGI, one :class:`~guardrail.core.engine.StreamGuard` per guarded stream.

The middleware instance is immutable after ``__init__``; everything about one request lives in
a :class:`_GuardedResponse`. It runs on asyncio (uvicorn, hypercorn and granian's asyncio
workers, uvloop included). Concurrency, per request, kept to what each request needs:

    request task ── reads the request body, then runs the app in a cancel scope
      ├─ disconnect listener (a task, only once the body is read): owns the server's receive
      └─ deadline timer (an event-loop timer, only while a time limit is armed): when a
         deadline passes, a short task calls expire() under the send lock

Whoever ends the stream first wins: the guard (a rule tripped, a deadline passed), the client
(it went away) or the app (it finished or failed). Every send goes through one lock. When the
guard ends a stream early, its ending goes out with ``more_body: False`` and then the app's
scope is cancelled, so the app's generators close and an upstream model behind it stops.

A fallback with ``url`` ends the app's part only: the safe prefix goes out with the body still
open, the app is cancelled, and once it has stopped the request task sends the original request
to the fallback upstream and streams its answer, through a continuation guard, into the same
response (``_branch``; the HTTP half is :mod:`guardrail.asgi.branch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import sys
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any, cast

import anyio
import httpx

from guardrail._asgi import openai_error, send_json, send_response
from guardrail._types import ASGIApp, Message, Receive, Scope, Send
from guardrail.asgi._sync import RequestClock, SendLock
from guardrail.asgi.branch import FallbackRequest, FallbackUnavailable, display_url, fallback_request, open_fallback
from guardrail.asgi.encoding import ContentDecoder, DecodeError, Reading, read_content_type, sniff_framing
from guardrail.asgi.paths import path_forms, route_path
from guardrail.asgi.record import RuleHit, StreamRecord, log_record
from guardrail.asgi.request import ChatRequest, read_request
from guardrail.config import RuleSet, load_rules
from guardrail.core.dialect import Framing, RequestInfo
from guardrail.core.dialects import dialect_for_path, get_dialect, start_stream
from guardrail.core.dialects.vercel_ui import HEADER as UI_STREAM_HEADER
from guardrail.core.engine import StreamGuard
from guardrail.core.outputs import (
    Anomaly,
    AnomalyKind,
    Ended,
    Intervention,
    Outcome,
    Output,
    Released,
    Send as SendBytes,
)
from guardrail.core.rule import Action, BoundRule
from guardrail.core.tokens import BPEEncoding
from guardrail.exceptions import UpstreamStreamError
from guardrail.metrics import GuardMetrics
from guardrail.rules.budget import TokenBudget
from guardrail.tokenizers import get_encoding

logger = logging.getLogger(__name__)

RuleSource = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | RuleSet
RecordCallback = Callable[[StreamRecord], None]

# Prompts up to this size are counted on the event loop (well under a millisecond); larger ones
# in a worker thread, so that one request never stalls the others' streams.
PROMPT_INLINE_BYTES = 16 * 1024
# Prompts over this size are not counted at all: a prompt budget refuses them.
PROMPT_MAX_BYTES = 4 * 1024 * 1024
PROMPT_TOO_LARGE = 1 << 62  # stands for the count of a prompt over PROMPT_MAX_BYTES


def _asks_for_usage(payload: Mapping[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


# Deltas are counted in guardrail_deltas_total this many at a time (and at the end of the
# stream), and one delta in this many has its check time observed in guardrail_check_seconds.
DELTAS_PER_REPORT = 16

# What the guard did, one WARNING line each: rule, action, request id, where in the text; never the
# text. WARNING, so that an app that configures no logging still shows it (Python's last-resort
# handler writes WARNING and above to stderr); turn it down with logging.getLogger("guardrail").
INTERVENTION_LOG = "rule %s: %s on %s at %d-%d (request %s)"
RULE_ERROR_LOG = "rule %s failed: rule_error, the stream was ended (request %s)"

# Only SSE bodies are guarded; an encoded body would need decoding first, so the middleware
# must sit inside any compression middleware (Starlette's GZip already skips event streams).
GUARDED_CONTENT_TYPE = b"text/event-stream"


class GuardrailMiddleware:
    """Guards the server-sent event streams of an ASGI app against the rules of a rule file.

    Args:
        app: the ASGI app to wrap.
        rules: a rule file path, a list of paths, or a loaded :class:`~guardrail.config.RuleSet`.
        metrics: where to count; by default a :class:`~guardrail.metrics.GuardMetrics` on
            prometheus_client's default registry.
        on_record: called with the :class:`~guardrail.asgi.record.StreamRecord` of every
            guarded stream when it ends (the record is also logged to ``guardrail.record``).
        record_text: put the text the client received into the record.

    Raises:
        ConfigError: a rule file is invalid (every problem is listed, with file and line).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        rules: RuleSource,
        metrics: GuardMetrics | None = None,
        on_record: RecordCallback | None = None,
        record_text: bool = False,
    ) -> None:
        self.app = app
        self.rules = load_rules(rules)
        self.metrics = metrics if metrics is not None else GuardMetrics()
        self.metrics.declare_rules({rule.name: rule.action for rule in self.rules.rules})
        # Loaded now, not on the first request: a BPE file takes a moment to load and verify.
        self.encodings = {group.tokenizer: get_encoding(group.tokenizer) for group in self.rules.groups}
        self.on_record = on_record
        self.record_text = record_text
        self._clock: RequestClock | None = None  # the requests' clock, on the loop they run on

    def clock(self, loop: asyncio.AbstractEventLoop) -> RequestClock:
        """The clock of the requests on ``loop``: one per event loop, not one per request."""
        clock = self._clock
        if clock is None or clock.loop is not loop:
            clock = self._clock = RequestClock()
        return clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        forms = path_forms(scope)
        if forms is None:
            # A path no router resolves the same way twice (an encoded slash, a NUL...): refused
            # where the rules guard it as the server decoded it, passed untouched elsewhere.
            routed = route_path(scope)
            if self.rules.rules_for(routed) or self.rules.rules_for(routed.lower()):
                message = "This request path cannot be read safely (encoded slashes, NUL or '..' above the root)."
                await send_json(send, 400, openai_error(message, type="invalid_request_error", code="invalid_path"))
                return
            await self.app(scope, receive, send)
            return
        for path in forms:
            rules = self.rules.rules_for(path)
            if rules:
                break
        else:
            await self.app(scope, receive, send)
            return
        encoding = self.encodings.get(self.rules.tokenizer_for(path))
        await _GuardedResponse(self, rules, scope, send, encoding, forms[0]).run(receive)


async def _stop(*tasks: asyncio.Task[None] | None) -> None:
    """Cancel a request's helper tasks and wait for them to end (they hand their failures to the request)."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    if running:
        await asyncio.wait(running)


def _request_id(scope: Scope) -> str:
    """The request's ``x-request-id`` header (up to 128 characters), or a new id."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"x-request-id":
            return str(value.decode("latin-1"))[:128]
    return uuid.uuid4().hex


# The async generators first iterated while a guarded request runs (its app, its response body).
_GENERATORS: contextvars.ContextVar[list[weakref.ref[AsyncGenerator[Any, Any]]]] = contextvars.ContextVar(
    "guardrail_generators"
)
# What is left of a request the guard has let go of (see _drop_request).
_NO_REQUEST = ChatRequest()
# The status of a whole (JSON) answer the guard ended with an error, by outcome.
_WHOLE_BODY_STATUS = {Outcome.UPSTREAM_ERROR: 502, Outcome.TIMEOUT: 504}

# A deadline timer that fires before its deadline by the clock is set again at least this much later.
TIMER_RESOLUTION = 0.001

# How long closing an app's generators after the guard stopped it may take.
CLOSE_GENERATORS_SECONDS = 1.0


def _track_async_generators() -> None:
    """Note every async generator first iterated in a guarded request (see :func:`_close_generators`).

    The event loop's own hooks keep working: the hook is wrapped, per thread, once.
    """
    hooks = sys.get_asyncgen_hooks()
    if getattr(hooks.firstiter, "_guardrail", False):
        return
    original = hooks.firstiter

    def firstiter(generator: AsyncGenerator[Any, Any]) -> None:
        tracked = _GENERATORS.get(None)
        if tracked is not None:
            tracked.append(weakref.ref(generator))
        if original is not None:
            original(generator)

    firstiter._guardrail = True  # type: ignore[attr-defined]
    sys.set_asyncgen_hooks(firstiter=firstiter, finalizer=hooks.finalizer)


async def _close_generators(generators: list[weakref.ref[AsyncGenerator[Any, Any]]]) -> None:
    """Close the generators the app left suspended when the guard stopped it.

    Cancelling the app stops it at its next await; a response body generator suspended at a
    ``yield`` is not resumed, so its ``finally`` (and the ``async with`` of the upstream stream
    inside it) would run only when the garbage collector finds it: the upstream would go on
    generating, and its connection stay taken. Closing them now releases both.
    """
    for ref in generators:
        generator = ref()
        state: Any = generator
        if generator is None or state.ag_frame is None or state.ag_running:  # finished, or running right now
            continue
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_GENERATORS_SECONDS):
            try:
                await generator.aclose()
            except Exception as exc:  # its own cleanup failed: nothing to do but say so
                logger.debug("closing an app generator raised %r", exc)


class _GuardedResponse:
    """One request's guard: decides at ``http.response.start`` whether the body is a stream to guard."""

    # One per open stream: slots keep it small (see the memory figures in bench/concurrency.py).
    __slots__ = (
        "announced",
        "app_error",
        "app_scope",
        "app_started",
        "branch",
        "branch_guard",
        "branch_scope",
        "client_left",
        "closed",
        "content_type",
        "decoder",
        "downstream",
        "encoding",
        "expiring",
        "failure",
        "framing",
        "guard",
        "held_start",
        "hits",
        "left",
        "listener",
        "loop",
        "metrics",
        "middleware",
        "model",
        "now",
        "outcome",
        "path",
        "prompt_tokens",
        "replay",
        "request",
        "_request_id",
        "response_started",
        "rules",
        "scope",
        "send_lock",
        "sniffed",
        "start",
        "timer",
        "timer_at",
        "unreported_deltas",
    )

    def __init__(
        self,
        middleware: GuardrailMiddleware,
        rules: tuple[BoundRule, ...],
        scope: Scope,
        send: Send,
        encoding: BPEEncoding | None,
        path: str,
    ) -> None:
        self.middleware = middleware
        self.path = path  # as resolved: what the rules and the dialect are chosen by
        self.metrics = middleware.metrics
        self.rules = rules
        self.scope = scope
        self._request_id: str | None = None  # made when first needed: most streams log nothing before the end
        self.downstream = send
        self.loop = asyncio.get_running_loop()
        self.now = middleware.clock(self.loop)
        self.start = self.now()
        self.request = _NO_REQUEST
        self.encoding = encoding
        self.prompt_tokens: int | None = None
        self.guard: StreamGuard | None = None
        self.response_started = False
        self.closed = False  # the body has been completed towards the client
        self.outcome: Outcome | None = None
        self.send_lock = SendLock()
        self.unreported_deltas = 0
        self.app_scope = anyio.CancelScope()
        self.replay: list[Message] | None = None  # the request's messages, read first, until the app has them
        self.client_left = False
        self.left: asyncio.Future[None] | None = None  # made when the app waits for the client to leave
        self.timer: asyncio.TimerHandle | None = None  # set for the guard's next deadline, while one is armed
        self.timer_at = 0.0
        self.expiring: asyncio.Task[None] | None = None  # a deadline passed: expire() runs in this task
        self.listener: asyncio.Task[None] | None = None  # waits for the client to leave, once the body is read
        self.failure: Exception | None = None  # the server's receive or send, failed in a helper task
        self.model: str | None = None  # the model the request names, for the record (kept past the request)
        self.hits: list[RuleHit] | None = None  # for the record, from the first
        self.branch: Ended | None = None  # a url fallback fired: the app is done, the fallback answers
        self.branch_guard: StreamGuard | None = None  # and guards its answer
        self.branch_scope: anyio.CancelScope | None = None  # and is read in this scope
        # The app's response start, held until the guard knows how to read the body (and, for a
        # whole body, until it is guarded); then how to read it.
        self.held_start: Message | None = None
        self.app_error: Exception | None = None
        self.app_started = False
        self.content_type = b""
        self.announced: str | None = None  # the dialect the answer's headers name (the UI message stream's)
        self.decoder: ContentDecoder | None = None
        self.sniffed: bytearray | None = None  # the first bytes, while the framing is not known
        self.framing = Framing.SSE

    @property
    def request_id(self) -> str:
        if self._request_id is None:
            self._request_id = _request_id(self.scope)
        return self._request_id

    async def run(self, receive: Receive) -> None:
        # One coroutine for the whole request, the app's call included: each coroutine still
        # waiting is a frame kept for as long as the stream is open.
        generators: list[weakref.ref[AsyncGenerator[Any, Any]]] = []
        token = _GENERATORS.set(generators)
        _track_async_generators()
        try:
            whole = await self._read_request(receive)
            if whole is not None:
                if whole:
                    self.listener = self.loop.create_task(self._listen_for_disconnect(receive))
                app_receive = self._receive_for_app if whole else self._receive_then(receive)
                try:
                    with self.app_scope:
                        await self.middleware.app(self.scope, app_receive, self.send)
                    await self._app_returned()
                except Exception as exc:
                    await self._app_failed(exc)
                if self.branch is not None:
                    await self._branch(self.branch)
        finally:
            self._set_timer(None)
            await _stop(self.expiring, self.listener)
            _GENERATORS.reset(token)
            if self.app_scope.cancel_called:
                await _close_generators(generators)
            self._finish()
        if self.failure is not None:
            raise self.failure  # the server's receive or send failed: the connection is gone
        if self.app_error is not None:
            # ASGI manners: the server sees the app's own exception (the client has its ending).
            raise self.app_error

    async def _read_request(self, receive: Receive) -> bool | None:
        """Read the request; whether its body was read whole, or None if it was refused (a prompt budget)."""
        self.request, self.replay, whole = await read_request(receive)
        self.model = self.request.model
        if self.request.payload is not None and self.encoding is not None:
            self.prompt_tokens = await self._count_prompt(self.request.payload, self.encoding)
            if self.prompt_tokens is not None and await self._refused_prompt(self.prompt_tokens):
                return None
        elif not whole and await self._refused_prompt(PROMPT_TOO_LARGE):
            return None  # a body too large to keep cannot be counted: a prompt budget refuses it
        if self.request.stream:
            self._arm()  # first-token limits count from the request, before any response
        return whole

    # -- receive ----------------------------------------------------------------------------

    def _replayed(self) -> Message | None:
        """The next request message read before the app ran, if one is left."""
        replay = self.replay
        if not replay:
            return None
        message = replay.pop(0)
        if not replay:
            self.replay = None
        return message

    async def _receive_for_app(self) -> Message:
        message = self._replayed()
        if message is not None:
            return message
        if not self.client_left:
            if self.left is None:
                self.left = self.loop.create_future()
            await asyncio.shield(self.left)  # (a waiter cancelled does not cancel it for the others)
        return {"type": "http.disconnect"}

    def _receive_then(self, receive: Receive) -> Receive:
        async def replay_then_receive() -> Message:
            message = self._replayed()
            return message if message is not None else await receive()

        return replay_then_receive

    async def _listen_for_disconnect(self, receive: Receive) -> None:
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self._client_went_away()
                    return
                await anyio.lowlevel.checkpoint()  # a server that answers at once must not starve the app
        except Exception as exc:
            self._helper_failed(exc)

    def _helper_failed(self, exc: Exception) -> None:
        """The server's receive or send failed in a helper task: the connection is gone; the request raises it."""
        if self.failure is None:
            self.failure = exc
        self._client_went_away()

    def _client_went_away(self) -> None:
        self.client_left = True
        if self.left is not None and not self.left.done():
            self.left.set_result(None)
        if self.branch_scope is not None:
            self.branch_scope.cancel()  # stop reading the fallback: nobody is left to answer
        if not self.closed:
            self.closed = True
            self._settle(Outcome.CLIENT_DISCONNECTED)
            self.app_scope.cancel()

    # -- send -------------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        if self.closed or self.branch is not None:
            # The stream has ended; the app is being cancelled. Nothing more goes out.
            await anyio.lowlevel.checkpoint()
            return
        # Taken in two steps rather than with ``async with``: this runs for every delta, and
        # nearly always nobody else is sending.
        lock = self.send_lock
        if not lock.acquire_nowait():
            await lock.acquire()  # a passed deadline is being sent: wait for it
        try:
            if self.closed or self.branch is not None:
                return  # ended while this message waited for the lock
            message_type = message["type"]
            if message_type == "http.response.body":
                if self.guard is not None or self.sniffed is not None:
                    await self._body(message)
                    return
            elif message_type == "http.response.start":
                if self.response_started or self.app_started:
                    return  # the guard answered in the app's place (a deadline passed first)
                self.app_started = True
                start = await self._start(message)
                if start is None:
                    return  # held until the body says how to read it, or refused
                message = start
                self.response_started = True
            await self.downstream(message)
        finally:
            lock.release()

    async def _start(self, message: Message) -> Message | None:
        """Decide how to read the answer; return the start to send now, or None to hold it."""
        status = int(message.get("status", 200))
        headers: list[tuple[bytes, bytes]] = list(message.get("headers", []))
        content_type = b""
        encoding = b""
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-type":
                content_type = value.split(b";", 1)[0].strip().lower()
            elif lowered == b"content-encoding":
                encoding = value.strip().lower()
            elif lowered == UI_STREAM_HEADER:
                self.announced = "vercel_ui"
        reading, framing = read_content_type(content_type)
        if not 200 <= status < 300 and content_type != b"text/event-stream":
            # An error answer: its JSON is read whole (strings checked); anything else passes.
            reading, framing = (Reading.GUARD, Framing.JSON) if b"json" in content_type else (Reading.PASS, None)
        if reading is Reading.GUARD and encoding not in (b"", b"identity"):
            if ContentDecoder.supports(encoding.decode("latin-1")):
                self.decoder = ContentDecoder(encoding.decode("latin-1"))
            else:
                reading = Reading.REFUSE
        if reading is Reading.REFUSE and self.middleware.rules.passes_unreadable(self.path):
            reading = Reading.PASS
        if reading is Reading.PASS:
            self.guard = None  # nothing the guard can or may read: no deadlines either
            return message
        if reading is Reading.REFUSE:
            await self._refuse_unreadable(content_type, encoding)
            return None
        if framing is None:
            self.content_type = content_type  # read again with the first bytes
            self.sniffed = bytearray()
        else:
            self._arm(framing)
            self._drop_request()
        # The guard may change the body, so a length announced by the app would be wrong.
        drop = {b"content-length", b"content-encoding"} if self.decoder is not None else {b"content-length"}
        self.held_start = {**message, "headers": [(k, v) for k, v in headers if k.lower() not in drop]}
        return None

    async def _refuse_unreadable(self, content_type: bytes, encoding: bytes) -> None:
        what = f"content-encoding {encoding.decode('latin-1')!r}" if encoding else ""
        what = what or f"content type {content_type.decode('latin-1') or '(none)'!r}"
        message = (
            f"guardrail cannot read this answer ({what}) on a guarded path, so it is not passed on. "
            "List the path under pass_unreadable in the rule file to pass such answers unguarded."
        )
        logger.warning("refused an unreadable answer on %s: %s", self.path, what)
        self.metrics.anomaly(AnomalyKind.UNREADABLE_RESPONSE)
        self.guard = None
        await self._send_error_response(502, "unreadable_response", message)
        self.closed = True
        self._settle(Outcome.UPSTREAM_ERROR)
        self.app_scope.cancel()

    def _arm(self, framing: Framing = Framing.SSE) -> None:
        if self.guard is not None and self.framing is framing:
            return
        self.framing = framing
        named = self.middleware.rules.dialect_for(self.path) or self.announced or dialect_for_path(self.path)
        if named is None and framing is Framing.TEXT:
            named = "text"
        info = RequestInfo(self.path, self.request.payload, int(time.time()))
        stream = start_stream(named, framing, info, prompt_tokens=self.prompt_tokens)
        self.guard = StreamGuard(
            self.rules,
            stream,
            # Time limits count from the request for a client that asked for a stream; a whole
            # answer is not held to them while the model writes it, only once its body starts.
            start=self.start if self.request.stream else self.now(),
            encoding=self.encoding,
            prompt_tokens=self.prompt_tokens,
            hide=self.middleware.rules.hidden_on(self.path),
        )
        self._watch()

    def _drop_request(self) -> None:
        """Let go of the request body once the answer's guard is armed, unless a url fallback may re-send it.

        Everything read from it is known by now (prompt tokens, flags, what the dialect takes),
        and a long conversation's body, parsed, would otherwise stay in memory as long as the
        stream is open.
        """
        if not any(rule.fallback is not None and rule.fallback.url is not None for rule in self.rules):
            self.request = _NO_REQUEST

    async def _body(self, message: Message) -> None:
        """Guard one body message (called by ``send`` with the send lock held, the stream still open).

        This runs once per delta, so the usual outcome, bytes for the client and nothing else to
        act on, goes straight downstream; anything more goes through :meth:`_emit`.
        """
        now = self.now()
        more_body = bool(message.get("more_body", False))
        data = message.get("body", b"")
        if self.decoder is not None:
            try:
                data = self.decoder.decode(bytes(data)) + (b"" if more_body else self.decoder.flush())
            except DecodeError as exc:
                await self._fail_unreadable(str(exc), now)
                return
        if self.sniffed is not None:
            self.sniffed += data
            framing = sniff_framing(bytes(self.sniffed), self.content_type, complete=not more_body)
            if framing is None:
                return  # too few bytes to tell the framing yet
            data, self.sniffed = bytes(self.sniffed), None
            named = self.middleware.rules.dialect_for(self.path) or self.announced or dialect_for_path(self.path)
            if framing is Framing.NDJSON and named != "ollama":
                await self._unreadable_body(data, more_body)  # no NDJSON dialect here yet
                return
            self._arm(framing)
            self._drop_request()
        guard = self.guard
        assert guard is not None
        outputs = self._feed(guard, data, now)
        if not more_body and not guard.ended:
            outputs += guard.close(now)
        if len(outputs) == 1 and self.response_started:
            only = outputs[0]
            if type(only) is SendBytes and only.data:
                # What nearly every delta comes to: bytes for the client, nothing else to act on.
                try:
                    await self.downstream({"type": "http.response.body", "body": only.data, "more_body": more_body})
                except OSError:
                    self._client_went_away()
                    return
                if not more_body:
                    self.closed = True
                return
        if outputs or not more_body:  # (no outputs: the delta's text is held back, for now)
            await self._emit(outputs, now, more_body=more_body)

    async def _unreadable_body(self, data: bytes, more_body: bool) -> None:
        """A body the guard cannot read, found only by its first bytes: refused, or passed if the rules say so."""
        if not self.middleware.rules.passes_unreadable(self.path):
            await self._refuse_unreadable(self.content_type, b"")
            return
        self.guard = None
        start, self.held_start = self.held_start, None
        assert start is not None
        self.response_started = True
        await self.downstream(start)  # (its length was dropped: the body goes out as it comes)
        await self.downstream({"type": "http.response.body", "body": data, "more_body": more_body})

    async def _fail_unreadable(self, detail: str, now: float) -> None:
        logger.warning("an answer on %s could not be decoded: %s", self.path, detail)
        self.metrics.anomaly(AnomalyKind.UNREADABLE_RESPONSE)
        if self.guard is None:
            self._arm(Framing.SSE)
        assert self.guard is not None
        await self._emit(self.guard.upstream_failed(detail, now), now, more_body=False)

    def _feed(self, guard: StreamGuard, data: bytes, now: float) -> list[Output]:
        """Feed ``guard`` the next bytes of a body; keep the deadline timer and the delta count in step."""
        deltas = guard.deltas
        outputs = guard.feed(data, now)
        if guard.timed:
            self._watch()  # text may have armed a deadline, or moved it
        if guard.deltas != deltas:
            # Reported every DELTAS_PER_REPORT deltas (and when the stream ends), with that delta's
            # check time as the histogram's sample: metrics stay a small part of the per-delta cost.
            self.unreported_deltas += guard.deltas - deltas
            if self.unreported_deltas >= DELTAS_PER_REPORT:
                self.metrics.delta(self._dialect_name(), self.now() - now, self.unreported_deltas)
                self.unreported_deltas = 0
        return outputs

    async def _emit(self, outputs: list[Output], now: float, *, more_body: bool) -> None:
        """Send what the guard produced at ``now``; end the body and stop the app if it ended the stream."""
        data, ended = self._digest(outputs, now)
        if ended is not None and ended.fallback is not None and ended.fallback.url is not None:
            self.branch = ended  # the body stays open for the fallback's answer (see _branch)
            more_body = True
        elif ended is not None:
            more_body = False
        try:
            if not self.response_started and (data or ended is not None):
                await self._send_start(data, ended, more_body)
            if data or not more_body:
                await self.downstream({"type": "http.response.body", "body": data, "more_body": more_body})
        except OSError:
            self._client_went_away()
            return
        if not more_body:
            self.closed = True
        if ended is not None:
            if ended is not self.branch:
                self._settle(ended.outcome)
            if ended.outcome is not Outcome.COMPLETED:
                # Stop the app at its next checkpoint: its generators close, upstream generation stops.
                self.app_scope.cancel()

    async def _send_start(self, data: bytes, ended: Ended | None, more_body: bool) -> None:
        """Send the held start of the app's response, or one in its place (a deadline passed first)."""
        self.response_started = True
        start = self.held_start
        if start is None:
            headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")]
            start = {"type": "http.response.start", "status": 200, "headers": headers}
        self.held_start = None
        if self.framing is Framing.JSON and not more_body:
            # A whole body goes out at once, with its length; as a 502 if the guard failed it, a 504
            # if a time limit ended it (an error body: there is no stop reason for a whole body to carry).
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", b"%d" % len(data)))
            status = _WHOLE_BODY_STATUS.get(ended.outcome) if ended is not None else None
            status = status or start.get("status", 200)
            start = {**start, "status": status, "headers": headers}
        await self.downstream(start)
        self.metrics.stream_started(self._dialect_name())

    def _digest(self, outputs: list[Output], now: float) -> tuple[bytes, Ended | None]:
        data = b""
        ended: Ended | None = None
        for output in outputs:
            if isinstance(output, SendBytes):
                data += output.data
            elif isinstance(output, Intervention):
                self._intervened(output)
            elif isinstance(output, Released):
                self.metrics.held(output.chars, now - output.held_since)
            elif isinstance(output, Anomaly):
                self.metrics.anomaly(output.kind)
                if output.kind is AnomalyKind.RULE_ERROR:
                    logger.warning(RULE_ERROR_LOG, output.rule, self.request_id)
                    logger.debug("rule %s failed: %s", output.rule, output.detail)  # a plugin's message may quote text
                else:
                    logger.warning(
                        "stream anomaly %s: %s (stream ended: %s; request %s)",
                        output.kind,
                        output.detail,
                        output.ended_stream,
                        self.request_id,
                    )
            elif isinstance(output, Ended):
                ended = output
        return data, ended

    def _intervened(self, hit: Intervention) -> None:
        self.metrics.intervention(hit.rule, hit.action, leaked_chars=hit.leaked)
        logger.warning(INTERVENTION_LOG, hit.rule, hit.action, hit.channel, hit.start, hit.end, self.request_id)
        entry = RuleHit(hit.rule, hit.action, hit.channel, hit.start, hit.end, hit.detail)
        if self.hits is None:
            self.hits = [entry]
        else:
            self.hits.append(entry)

    # -- deadlines --------------------------------------------------------------------------

    def _timed_guard(self) -> StreamGuard | None:
        """The guard whose deadlines count: a url fallback's, once it answers; else the stream's."""
        return self.branch_guard if self.branch_guard is not None else self.guard

    def _watch(self) -> None:
        """Keep the timer on the timed guard's next deadline: called when it may have changed.

        A deadline that moved later (the idle limit, after each delta) leaves the timer where it
        is: it fires, finds the deadline not yet due and sets itself again. Only a deadline that
        moved earlier, or a new one, moves the timer.
        """
        guard = self._timed_guard()
        deadline = guard.deadline if guard is not None and not self.closed else None
        if deadline is None or self.timer is None or deadline < self.timer_at:
            self._set_timer(deadline)

    def _set_timer(self, deadline: float | None, at: float | None = None) -> None:
        """Set the timer for ``deadline`` (to fire at ``at``, if later), replacing any; None: no timer."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if deadline is not None:
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline if at is None else at, self._deadline_passed)

    def _deadline_passed(self) -> None:
        """The timer fired: expire the guard if its deadline is due (in a task: it sends)."""
        self.timer = None
        guard = self._timed_guard()
        if guard is None or self.closed or self.expiring is not None:
            return  # (a running expire sets the timer again when it is done)
        deadline = guard.deadline
        if deadline is None:
            return
        if deadline > self.now():
            # Moved later since the timer was set, or the loop fired early by its clock's
            # resolution (uvloop's is a millisecond): look again then, and not sooner than that.
            self._set_timer(deadline, max(deadline, self.loop.time() + TIMER_RESOLUTION))
        else:
            self.expiring = self.loop.create_task(self._expire(guard))

    async def _expire(self, guard: StreamGuard) -> None:
        try:
            async with self.send_lock:
                if guard is self._timed_guard() and not self.closed:
                    now = self.now()
                    if guard is self.branch_guard:
                        await self._emit_branch(guard.expire(now), now)
                        if self.closed and self.branch_scope is not None:
                            self.branch_scope.cancel()  # a time limit ended the stream: stop reading the fallback
                    else:
                        guard = self._framed_for_ending(guard)
                        await self._emit(guard.expire(now), now, more_body=True)
        except Exception as exc:
            self._helper_failed(exc)
        finally:
            self.expiring = None
        self._watch()

    def _framed_for_ending(self, guard: StreamGuard) -> StreamGuard:
        """The guard to end the answer with when a deadline passes before its body showed its framing.

        A stream request whose answer is labelled JSON but has sent no body yet still has the
        guard armed at the request's start, which writes event-stream bytes: the ending goes out
        as the JSON body the label promises instead (a 504 with the dialect's error).
        """
        if (
            self.sniffed is None
            or sniff_framing(bytes(self.sniffed), self.content_type, complete=True) is not Framing.JSON
        ):
            return guard
        self.sniffed = None
        self._arm(Framing.JSON)
        assert self.guard is not None
        return self.guard

    # -- endings ----------------------------------------------------------------------------

    async def _app_returned(self) -> None:
        if self.guard is None or not self.response_started:
            return
        # Under the lock: a passed deadline's ending may be on its way out; it finishes first.
        async with self.send_lock:
            if not self.closed and not self.guard.ended:
                # The app returned without completing its body: finish it cleanly rather than let
                # the server cut the connection (which clients report as a network error).
                now = self.now()
                await self._emit(self.guard.close(now), now, more_body=False)

    async def _app_failed(self, exc: Exception) -> None:
        """End the answer as the app's failure allows; the exception is re-raised once the client has it."""
        if not isinstance(exc, UpstreamStreamError):  # the proxy's own signal, handled here in full
            self.app_error = exc
        if self.closed or self.branch is not None:
            return
        if self.response_started and self.guard is None:
            return  # not a guarded stream: not ours to mend
        logger.error("app failed while streaming %s", self.scope.get("path", ""), exc_info=exc)
        async with self.send_lock:
            if self.closed:
                return  # a passed deadline's ending went out while this waited for the lock
            if not self.response_started:
                await self._send_error_response(502, "upstream_error", "the app failed before it answered")
                self.closed = True
                self._settle(Outcome.UPSTREAM_ERROR)
                return
            assert self.guard is not None
            now = self.now()
            outputs = self.guard.upstream_failed(f"{type(exc).__name__} while streaming", now)
            await self._emit(outputs, now, more_body=False)

    async def _count_prompt(self, payload: Mapping[str, Any], encoding: BPEEncoding) -> int | None:
        """The request's prompt tokens, counted only when needed and never on the event loop for long.

        Counted when a rule has a prompt budget, or the client asked for usage that the guard may
        have to write. A budget the body's size cannot exceed (a token is at least one byte) needs
        no count. Prompts over :data:`PROMPT_INLINE_BYTES` are counted in a worker thread; over
        :data:`PROMPT_MAX_BYTES` not at all (a prompt budget then refuses the request).
        """
        budgets = [
            rule.rule.max_prompt_tokens
            for rule in self.rules
            if isinstance(rule.rule, TokenBudget) and rule.rule.max_prompt_tokens is not None
        ]
        size = len(self.request.body or b"")
        needed = bool(budgets) and size > min(budgets)
        if not needed and not _asks_for_usage(payload):
            return None
        if size > PROMPT_MAX_BYTES:
            return PROMPT_TOO_LARGE if needed else None
        name = self.middleware.rules.dialect_for(self.path) or dialect_for_path(self.path) or "openai_chat"
        dialect = get_dialect(name)
        encode = encoding.encode_ordinary

        def count() -> int:
            return dialect.prompt_tokens(payload, lambda text: len(encode(text)))

        if size <= PROMPT_INLINE_BYTES:
            return count()
        return await anyio.to_thread.run_sync(count)

    async def _refused_prompt(self, prompt_tokens: int) -> bool:
        """Refuse a prompt over a ``max_prompt_tokens`` budget with a 400, before the app runs."""
        for rule in self.rules:
            budget = rule.rule
            if not isinstance(budget, TokenBudget) or not budget.prompt_over_budget(prompt_tokens):
                continue
            if prompt_tokens == PROMPT_TOO_LARGE:
                detail = "prompt too large to count"
            else:
                detail = f"prompt of {prompt_tokens} tokens over {budget.max_prompt_tokens}"
            self._intervened(Intervention(rule.name, rule.action, "prompt", 0, 0, 0, detail))
            if rule.action is Action.LOG:
                continue
            counted = f"{prompt_tokens} tokens" if prompt_tokens != PROMPT_TOO_LARGE else "too many tokens to count"
            message = (
                f"This request's messages have {counted}, more than the {budget.max_prompt_tokens} "
                f"allowed here (rule {rule.name!r}). Shorten the conversation and try again."
            )
            await self._send_error_response(
                400, "prompt_too_long", message, error_type="invalid_request_error", param="messages", retry=False
            )
            return True
        return False

    async def _send_error_response(
        self,
        status: int,
        code: str,
        message: str,
        *,
        error_type: str = "upstream_error",
        param: str | None = None,
        retry: bool = True,
    ) -> None:
        # The SDKs retry some statuses on their own; a policy refusal would fail the same way again.
        headers = [] if retry else [(b"x-should-retry", b"false")]
        name = self.middleware.rules.dialect_for(self.path) or dialect_for_path(self.path)
        try:
            if name is None or name == "openai_chat":
                error = openai_error(message, type=error_type, code=code, param=param)
                await send_json(self.downstream, status, error, headers)
            else:  # in the envelope the endpoint's clients read
                body = get_dialect(name).error_body(status, code, message, param)
                await send_response(self.downstream, status, body, b"application/json", headers)
        except OSError:
            self._client_went_away()

    # -- url fallback -----------------------------------------------------------------------

    async def _branch(self, ended: Ended) -> None:
        """Stream a url fallback's answer after the safe prefix: the app has stopped by now."""
        assert self.guard is not None and ended.fallback is not None and ended.fallback.url is not None
        if self.closed:
            return  # the client left while the app was stopping: nobody to answer
        fallback = ended.fallback
        now = self.now()
        # The same rules guard the fallback's answer; its chunks join the first stream's identity.
        stream = self.guard.stream.continuation(  # type: ignore[attr-defined]  # (the engine checked it has one)
            ledger=self.guard,
            include_usage=self.request.include_usage,
            prompt_tokens=self.prompt_tokens,
        )
        guard = StreamGuard(
            self.rules,
            stream,
            start=now,
            continuation=True,
            encoding=self.encoding,
            prompt_tokens=self.prompt_tokens,
            text_before=self.guard.sent_text(),  # usage counts the answer the client reads, prefix and all
        )
        self.branch_guard = guard
        request = fallback_request(self.request, fallback, self.scope, self.guard.dialect)
        if request is None:
            logger.warning(
                "rule %s: fallback %r has nothing to re-send (the request body was too large or not a JSON object); "
                "ending the stream as an abort",
                ended.rule,
                fallback.name,
            )
            async with self.send_lock:
                if not self.closed:
                    await self._emit_branch(guard.abort(now), now)
            return
        logger.info("rule %s: branching to fallback %r at %s", ended.rule, fallback.name, display_url(request.url))
        with anyio.CancelScope() as scope:  # cancelled when the client leaves, or a time limit ends the stream
            self.branch_scope = scope
            self._watch()
            await self._relay_fallback(guard, request)

    async def _relay_fallback(self, guard: StreamGuard, request: FallbackRequest) -> None:
        try:
            async with open_fallback(request) as response:
                chunks = cast(AsyncGenerator[bytes, None], response.aiter_raw())
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        async with self.send_lock:
                            if not self.closed:
                                now = self.now()
                                await self._emit_branch(self._feed(guard, chunk, now), now)
                        if self.closed:
                            return  # ended (a second trip, a time limit) or the client left: stop the fallback
        except FallbackUnavailable as exc:
            logger.warning("%s; ending the stream as an abort", exc)
            now = self.now()
            outputs = guard.abort(now)
        except httpx.TransportError as exc:
            logger.warning("the fallback upstream failed mid-stream: %s", type(exc).__name__)
            now = self.now()
            outputs = guard.upstream_failed(f"{type(exc).__name__} in the fallback answer", now)
        else:
            now = self.now()
            outputs = guard.close(now)
        async with self.send_lock:
            if not self.closed:
                await self._emit_branch(outputs, now)

    async def _emit_branch(self, outputs: list[Output], now: float) -> None:
        ended = next((output for output in outputs if isinstance(output, Ended)), None)
        if ended is not None and self.branch is not None:
            # A fallback answer that completes counts as what sent the stream there (a trip, a
            # timeout); one that ends otherwise, as what ended it.
            self._settle(self.branch.outcome if ended.outcome is Outcome.COMPLETED else ended.outcome)
        await self._emit(outputs, now, more_body=ended is None)

    # -- outcome ----------------------------------------------------------------------------

    def _dialect_name(self) -> str:
        return self.guard.dialect if self.guard is not None else "openai_chat"

    def _settle(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome

    def _finish(self) -> None:
        """Count the stream and write its record, once, whatever ended it."""
        guard = self.guard
        if guard is None or not self.response_started:
            return
        if self.unreported_deltas:
            self.metrics.delta(self._dialect_name(), 0.0, self.unreported_deltas, sampled=False)
        now = self.now()
        outcome = self.outcome or Outcome.COMPLETED
        first = guard.first_text_at
        # (The dialect is the guard's: one told by the first event is known only now.)
        record = StreamRecord(self.request_id, self.path, guard.dialect, self.model, hits=self.hits or [])
        record.outcome = outcome
        record.duration = now - self.start
        record.deltas = guard.deltas
        record.prompt_tokens = self.prompt_tokens
        record.completion_tokens = guard.completion_tokens()
        second = self.branch_guard
        if second is not None and self.branch is not None and self.branch.fallback is not None:
            # Both legs: the continuation counts the whole answer the client received.
            first_leg, both = record.completion_tokens, second.completion_tokens()
            record.completion_tokens = both
            record.deltas += second.deltas
            fallback = self.branch.fallback
            tokens = both - first_leg if both is not None and first_leg is not None else None
            record.fallback = {"name": fallback.name, "model": fallback.model, "completion_tokens": tokens}
        if self.prompt_tokens is not None:
            self.metrics.tokens("prompt", self.prompt_tokens)
        if record.completion_tokens is not None:
            self.metrics.tokens("completion", record.completion_tokens)
        if self.middleware.record_text:
            record.text = guard.sent_text()
        record.time_to_first_token = first - self.start if first is not None else None
        self.metrics.stream_finished(
            self._dialect_name(), outcome, duration=record.duration, time_to_first_token=record.time_to_first_token
        )
        log_record(record)
        if self.middleware.on_record is not None:
            try:
                self.middleware.on_record(record)
            except Exception:
                logger.exception("on_record callback failed")
