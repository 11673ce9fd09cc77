"""GuardrailMiddleware: pure ASGI, one :class:`~guardrail.core.engine.StreamGuard` per guarded stream.

The middleware instance is immutable after ``__init__``; everything about one request lives in
a :class:`_GuardedResponse`. The app runs in the request's own task (context variables keep
working) inside a cancel scope: when the guard ends a stream early, the ending goes out with
``more_body: False`` and then the scope is cancelled, so the app's generators are closed and
an upstream model behind it stops generating.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import anyio

from guardrail._types import ASGIApp, Message, Receive, Scope, Send
from guardrail.config import RuleSet, load_rules
from guardrail.core.engine import StreamGuard
from guardrail.core.outputs import Anomaly, Ended, Intervention, Outcome, Output
from guardrail.core.outputs import Send as SendBytes
from guardrail.core.rule import BoundRule

logger = logging.getLogger(__name__)

RuleSource = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | RuleSet

# Only SSE bodies are guarded; an encoded body would need decoding first, so the middleware
# must sit inside any compression middleware (Starlette's GZip already skips event streams).
GUARDED_CONTENT_TYPE = b"text/event-stream"


class GuardrailMiddleware:
    """Guards the server-sent event streams of an ASGI app against the rules of a rule file.

    Args:
        app: the ASGI app to wrap.
        rules: a rule file path, a list of paths, or a loaded :class:`~guardrail.config.RuleSet`.

    Raises:
        ConfigError: a rule file is invalid (every problem is listed, with file and line).
    """

    def __init__(self, app: ASGIApp, *, rules: RuleSource) -> None:
        self.app = app
        self.rules = load_rules(rules)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rules = self.rules.rules_for(scope.get("path", ""))
        if not rules:
            await self.app(scope, receive, send)
            return
        await _GuardedResponse(self.app, rules, send).run(scope, receive)


class _GuardedResponse:
    """One request's guard: decides at ``http.response.start`` whether the body is a stream to guard."""

    def __init__(self, app: ASGIApp, rules: tuple[BoundRule, ...], send: Send) -> None:
        self.app = app
        self.rules = rules
        self.downstream = send
        self.guard: StreamGuard | None = None
        self.closed = False  # the body has been completed towards the client
        self.send_lock = anyio.Lock(fast_acquire=True)  # no trip through the event loop when uncontended
        self.app_scope = anyio.CancelScope()

    async def run(self, scope: Scope, receive: Receive) -> None:
        with self.app_scope:
            await self.app(scope, receive, self.send)

    async def send(self, message: Message) -> None:
        if self.closed:
            # The guard ended the body; the app is being cancelled. Nothing more goes out.
            await anyio.lowlevel.checkpoint()
            return
        message_type = message["type"]
        if message_type == "http.response.start":
            message = self._start(message)
        elif message_type == "http.response.body" and self.guard is not None:
            await self._body(message)
            return
        async with self.send_lock:
            await self.downstream(message)

    def _start(self, message: Message) -> Message:
        headers: list[tuple[bytes, bytes]] = list(message.get("headers", []))
        content_type = b""
        encoded = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-type":
                content_type = value.split(b";", 1)[0].strip().lower()
            elif lowered == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                encoded = True
        if content_type != GUARDED_CONTENT_TYPE or encoded:
            return message
        self.guard = StreamGuard(self.rules)
        # The guard may change the body, so a length announced by the app would be wrong.
        headers = [(name, value) for name, value in headers if name.lower() != b"content-length"]
        return {**message, "headers": headers}

    async def _body(self, message: Message) -> None:
        assert self.guard is not None
        now = time.monotonic()
        more_body = bool(message.get("more_body", False))
        outputs = self.guard.feed(message.get("body", b""), now)
        if not more_body and not self.guard.ended:
            outputs += self.guard.close(now)
        data, ended = self._handle(outputs)
        if ended:
            more_body = False
        if data or not more_body:
            async with self.send_lock:
                await self.downstream({"type": "http.response.body", "body": data, "more_body": more_body})
        if not more_body:
            self.closed = True
        if ended is not None and ended.outcome is not Outcome.COMPLETED:
            # Stop the app at its next checkpoint: its generators close, upstream generation stops.
            self.app_scope.cancel()

    def _handle(self, outputs: list[Output]) -> tuple[bytes, Ended | None]:
        data = b""
        ended: Ended | None = None
        for output in outputs:
            if isinstance(output, SendBytes):
                data += output.data
            elif isinstance(output, Intervention):
                logger.info(
                    "rule %s (%s) fired on %s at %d-%d", output.rule, output.action, output.channel, output.start, output.end
                )
            elif isinstance(output, Anomaly):
                logger.warning("stream anomaly %s: %s (stream ended: %s)", output.kind, output.detail, output.ended_stream)
            elif isinstance(output, Ended):
                ended = output
        return data, ended
