"""Cancellation and failure: the app, its upstream and the client are all stopped cleanly (issue 4).

Real uvicorn servers on real sockets, the official openai SDK (or httpx, where the test must drop
the connection itself) as the client. Apps run in the server's thread, so what they did is
recorded with ``threading.Event``s, waited on with timeouts.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from guardrail._types import Message, Receive, Scope, Send
from guardrail.asgi import GuardrailMiddleware
from guardrail.config import RuleSet
from guardrail.core.rule import Action, BoundRule, Fallback
from guardrail.metrics import GuardMetrics
from guardrail.rules.banned import BannedPatterns
from guardrail.rules.timeout import IdleTimeout
from tests.apps import (
    CHAT_PATH,
    KEEP_ALIVE,
    SSE_HEADERS,
    ChatChunks,
    ThreadLog,
    generator_app,
    split_events,
    stream_with_sdk,
    with_spec_version,
)
from tests.servers import serve_in_thread

pytestmark = pytest.mark.anyio

CHAT = ChatChunks()
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello?"}]
REQUEST = {"model": "m", "messages": MESSAGES, "stream": True}
KEY_PATTERN = r"sk-[A-Za-z0-9]{20,}"
KEY = "sk-" + "A1b2C3d4E5f6G7h8I9j0K1"
FALLBACK_TEXT = "Please try again."
CLIENT_TIMEOUT_SECONDS = 20.0
# uvicorn says ASGI HTTP 2.3, under which Starlette's StreamingResponse stops its own generator once
# receive() says the client left; under 2.4 it does not listen, and only the guard can stop the app.
SPEC_VERSIONS = pytest.mark.parametrize("spec_version", ["2.3", "2.4"], ids=["asgi-2.3", "asgi-2.4"])


def guarded(*rules: BoundRule, spec_version: str = "2.3") -> tuple[list[Middleware], CollectorRegistry]:
    """The guard as ``app.add_middleware`` would place it, with a registry of its own.

    The app below it is told the server speaks ASGI ``spec_version``.
    """
    registry = CollectorRegistry()
    guard = Middleware(GuardrailMiddleware, rules=RuleSet.from_rules(rules), metrics=GuardMetrics(registry))
    return [guard, Middleware(with_spec_version, spec_version=spec_version)], registry


def key_rule() -> BoundRule:
    return BoundRule(name="api-keys", rule=BannedPatterns(patterns=[KEY_PATTERN]), action=Action.ABORT)


def stalled_rule() -> BoundRule:
    return BoundRule(
        name="stalled", rule=IdleTimeout(seconds=1), action=Action.FALLBACK, fallback=Fallback("retry", FALLBACK_TEXT)
    )


async def waited(event: threading.Event, seconds: float) -> bool:
    """Wait for an event set in a server's thread, without blocking the test's event loop."""
    return await anyio.to_thread.run_sync(event.wait, seconds)


async def sample_eventually(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float | None:
    """The sample once the server thread has counted it (it counts after the body ends), or None."""
    with anyio.move_on_after(5):
        while not registry.get_sample_value(name, labels):
            await anyio.sleep(0.01)
    return registry.get_sample_value(name, labels)


def streams_ended(outcome: str) -> tuple[str, dict[str, str]]:
    return "guardrail_streams_total", {"dialect": "openai_chat", "outcome": outcome}


# --- acceptance 3: a client that goes away -----------------------------------------------------


@SPEC_VERSIONS
async def test_a_client_that_disconnects_after_three_chunks_closes_the_app_and_is_counted(spec_version: str) -> None:
    log = ThreadLog()

    async def answer() -> AsyncIterator[bytes]:
        try:
            yield CHAT.role()
            for number in itertools.count():
                await anyio.sleep(0.05)  # model pace
                yield CHAT.content(f"word{number} ")
        except BaseException:
            log.cancelled.set()
            raise
        finally:
            log.closed.set()

    middleware, registry = guarded(key_rule(), spec_version=spec_version)
    app = generator_app(answer, middleware=middleware)
    with anyio.fail_after(30), serve_in_thread(app, lifespan="off") as url:
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_SECONDS) as client:
            async with client.stream("POST", f"{url}{CHAT_PATH}", json=REQUEST) as response:
                assert response.status_code == 200
                received = b""
                async for data in response.aiter_raw():
                    received += data
                    if len(split_events(received)) >= 3:
                        break
            # Leaving the block closed the connection with the body unread: the client is gone.
        assert await waited(log.closed, 2), "the app's generator was not closed after the client left"
        assert log.cancelled.is_set()
        assert await sample_eventually(registry, *streams_ended("client_disconnected")) == 1.0
        assert registry.get_sample_value(*streams_ended("completed")) in (None, 0.0)


# --- acceptance 4: an app that fails -------------------------------------------------------------


async def test_an_app_that_raises_mid_stream_gives_the_sdk_an_api_error_not_a_connection_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def answer() -> AsyncIterator[bytes]:
        yield CHAT.role()
        yield CHAT.content("Hello ")
        yield CHAT.content("world")
        await anyio.sleep(0)
        raise RuntimeError("the model fell over")

    middleware, registry = guarded(key_rule())
    app = generator_app(answer, middleware=middleware)
    with anyio.fail_after(30), serve_in_thread(app, lifespan="off") as url:
        streamed = await stream_with_sdk(url)
        error = streamed.error
        assert error is not None, "the stream ended without an error"
        assert type(error) is openai.APIError
        assert not isinstance(error, openai.APIConnectionError)
        assert error.code == "upstream_error"
        assert streamed.text == "Hello world"
        assert await sample_eventually(registry, *streams_ended("upstream_error")) == 1.0
    failures = [record for record in caplog.records if record.levelno >= logging.ERROR and record.exc_info]
    assert any(
        isinstance(record.exc_info[1], RuntimeError) and "fell over" in str(record.exc_info[1])
        for record in failures
        if record.exc_info is not None
    ), "the original exception was not logged"


def failing_app(middleware: Sequence[Middleware]) -> Starlette:
    async def completions(request: Request) -> Response:
        await request.body()
        raise RuntimeError("no model today")

    return Starlette(routes=[Route(CHAT_PATH, completions, methods=["POST"])], middleware=list(middleware))


async def test_an_app_that_raises_before_its_response_gets_a_502_in_openais_error_envelope() -> None:
    middleware, _ = guarded(key_rule())
    app = failing_app(middleware)
    with anyio.fail_after(30), serve_in_thread(app, lifespan="off") as url:
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_SECONDS) as client:
            response = await client.post(f"{url}{CHAT_PATH}", json=REQUEST)
        assert response.status_code == 502
        assert response.headers["content-type"].startswith("application/json")
        envelope = response.json()
        assert set(envelope) == {"error"}
        assert set(envelope["error"]) == {"message", "type", "param", "code"}
        assert envelope["error"]["code"] == "upstream_error"
        assert isinstance(envelope["error"]["message"], str) and envelope["error"]["message"]

        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0) as sdk:
            with pytest.raises(openai.InternalServerError) as raised:
                await sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        assert raised.value.status_code == 502
        assert raised.value.code == "upstream_error"


# --- acceptance 5: the upstream behind the app sees its client go ------------------------------


@dataclass
class Upstream:
    """A model server: streams ``head`` then ``tail`` forever, slowly, until its client goes away."""

    head: Sequence[bytes]
    tail: bytes
    client_gone: threading.Event = field(default_factory=threading.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        message: Message = {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)})
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._listen, receive, tasks.cancel_scope)
            try:
                for body in itertools.chain(self.head, itertools.repeat(self.tail)):
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    await anyio.sleep(0.05)
            except OSError:
                self.client_gone.set()
                tasks.cancel_scope.cancel()

    async def _listen(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.client_gone.set()
        scope.cancel()


def relay(upstream_url: str, log: ThreadLog) -> Callable[[], AsyncIterator[bytes]]:
    """The app: streams the upstream's bytes through, as a thin OpenAI-compatible proxy would."""

    async def answer() -> AsyncIterator[bytes]:
        try:
            async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_SECONDS) as client:
                async with client.stream("POST", f"{upstream_url}{CHAT_PATH}", json=REQUEST) as response:
                    async for chunk in response.aiter_raw():
                        yield chunk
            log.exhausted.set()
        except BaseException:
            log.cancelled.set()
            raise
        finally:
            log.closed.set()

    return answer


@dataclass(frozen=True)
class UpstreamCase:
    rule: Callable[[], BoundRule]
    head: Sequence[bytes]
    tail: bytes
    text: str
    finish: str
    outcome: str


UPSTREAM_CASES = {
    "banned-pattern-abort": UpstreamCase(
        key_rule,
        [CHAT.role(), CHAT.content("Here is the key: "), CHAT.content(KEY[:9]), CHAT.content(KEY[9:])],
        CHAT.content(" and more"),
        "Here is the key: ",
        "content_filter",
        "aborted",
    ),
    "idle-timeout-fallback": UpstreamCase(
        stalled_rule,
        [CHAT.role(), CHAT.content("Thinking")],
        KEEP_ALIVE,
        "Thinking\n\n" + FALLBACK_TEXT,
        "stop",
        "timeout",
    ),
}


@SPEC_VERSIONS
@pytest.mark.parametrize("case", list(UPSTREAM_CASES.values()), ids=list(UPSTREAM_CASES))
async def test_when_the_guard_ends_a_stream_the_upstream_server_sees_its_client_go_away(
    case: UpstreamCase, spec_version: str
) -> None:
    upstream = Upstream(case.head, case.tail)
    log = ThreadLog()
    with anyio.fail_after(40), serve_in_thread(upstream, lifespan="off") as upstream_url:
        middleware, registry = guarded(case.rule(), spec_version=spec_version)
        app = generator_app(relay(upstream_url, log), middleware=middleware)
        with serve_in_thread(app, lifespan="off") as url:
            streamed = await stream_with_sdk(url)
            assert streamed.error is None
            assert streamed.text == case.text
            assert streamed.finish_reasons == [case.finish]
            assert await waited(log.closed, 5), "the app's generator was not closed"
            assert not log.exhausted.is_set()
            assert await waited(upstream.client_gone, 5), "the upstream server still has a client"
            assert await sample_eventually(registry, *streams_ended(case.outcome)) == 1.0
