"""App errors keep ASGI manners: the client gets its ending, then the server gets the app's own exception."""

from __future__ import annotations

import json

import anyio
import pytest

from guardrail._types import Receive, Scope, Send
from guardrail.asgi import GuardrailMiddleware
from guardrail.config import RuleSet
from guardrail.core.rule import Action, BoundRule
from guardrail.rules.banned import BannedPatterns
from tests.apps import CHAT_PATH, ChatChunks, Receiver, Recorder, http_scope

pytestmark = pytest.mark.anyio

RULES = RuleSet.from_rules(
    [BoundRule("keys", BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"]), Action.ABORT)], paths=["/v1/*"]
)


class AppBroke(Exception):
    pass


def failing_app(*, after_start: bool, content_type: bytes = b"text/event-stream") -> object:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        if after_start:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
            await send({"type": "http.response.body", "body": ChatChunks().content("Hello"), "more_body": True})
        raise AppBroke("the app broke")

    return app


@pytest.mark.parametrize("stream", [True, False])
async def test_a_failure_before_the_response_gets_a_502_then_reaches_the_server(stream: bool) -> None:
    recorder = Recorder()
    body = json.dumps({"model": "m", "messages": [], "stream": stream}).encode()
    with anyio.fail_after(5), pytest.raises(AppBroke):
        await GuardrailMiddleware(failing_app(after_start=False), rules=RULES)(  # type: ignore[arg-type]
            http_scope(CHAT_PATH), Receiver(body), recorder
        )
    assert recorder.start["status"] == 502
    assert json.loads(recorder.body)["error"]["code"] == "upstream_error"
    recorder.assert_ended_cleanly()


async def test_a_failure_mid_stream_ends_it_in_dialect_then_reaches_the_server() -> None:
    recorder = Recorder()
    with anyio.fail_after(5), pytest.raises(AppBroke):
        await GuardrailMiddleware(failing_app(after_start=True), rules=RULES)(  # type: ignore[arg-type]
            http_scope(CHAT_PATH), Receiver(), recorder
        )
    assert recorder.content == "Hello"
    assert json.loads(recorder.events[-1].data or "{}")["error"]["code"] == "upstream_error"
    recorder.assert_ended_cleanly()


async def test_a_failure_after_an_unguarded_response_started_is_the_apps_own_exception() -> None:
    recorder = Recorder()
    app = failing_app(after_start=True, content_type=b"image/png")
    with anyio.fail_after(5), pytest.raises(AppBroke):  # not an ExceptionGroup
        await GuardrailMiddleware(app, rules=RULES)(http_scope(CHAT_PATH), Receiver(), recorder)  # type: ignore[arg-type]
    assert recorder.start["headers"] == [(b"content-type", b"image/png")]


@pytest.mark.parametrize("status", [200, 204])
async def test_an_empty_json_answer_stays_empty(status: int) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    recorder = Recorder()
    with anyio.fail_after(5):
        await GuardrailMiddleware(app, rules=RULES)(http_scope(CHAT_PATH), Receiver(), recorder)
    assert recorder.start["status"] == status
    assert recorder.body == b""
