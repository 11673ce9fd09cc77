"""The ``idle_timeout`` rule: idle, first-token and total deadlines (issue 4).

Three layers. The engine is driven with a fake clock (``now`` is an argument, so no test waits).
The middleware runs under a real uvicorn server with the official openai SDK as the client, for
what the SDK sees and when. A raw ASGI harness whose ``send`` refuses to be entered twice shows
that a deadline firing during an app's send never interleaves with it.

Timing assertions are generous bounds on the limits the feature itself sets; nothing else is timed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import openai
import pytest
from prometheus_client import CollectorRegistry
from starlette.middleware import Middleware

from guardrail._types import ASGIApp, Message, Receive, Scope, Send
from guardrail.asgi import GuardrailMiddleware, middleware
from guardrail.asgi._sync import RequestClock
from guardrail.config import RuleSet, load_rules
from guardrail.core.engine import StreamGuard
from guardrail.core.outputs import Ended, Intervention, Outcome, Output, Send as SendBytes
from guardrail.core.rule import Action, BoundRule, Fallback
from guardrail.metrics import GuardMetrics
from guardrail.proxy.app import ServeSettings, build_app
from guardrail.proxy.demo import DemoModel
from guardrail.rules.banned import BannedPatterns
from guardrail.rules.timeout import IdleTimeout
from tests.apps import (
    DONE,
    KEEP_ALIVE,
    SSE_HEADERS,
    ChatChunks,
    ClientEvent,
    EndlessApp,
    Receiver,
    Recorder,
    ThreadLog,
    finish_reasons,
    generator_app,
    http_scope,
    joined_content,
    split_events,
    stream_with_sdk,
    with_spec_version,
)
from tests.servers import serve_in_thread

CHAT = ChatChunks()
FALLBACK_TEXT = "Please try again."
THREE_DELTAS = ["One, ", "two, ", "three."]


def idle_rule(
    action: Action,
    *,
    seconds: float = 1.0,
    first_token_seconds: float | None = None,
    total_seconds: float | None = None,
    name: str = "stalled",
) -> BoundRule:
    return BoundRule(
        name=name,
        rule=IdleTimeout(seconds, first_token_seconds=first_token_seconds, total_seconds=total_seconds),
        action=action,
        fallback=Fallback("retry", text=FALLBACK_TEXT) if action is Action.FALLBACK else None,
    )


def phrase_rule(action: Action = Action.ABORT) -> BoundRule:
    return BoundRule(
        name="codenames",
        rule=BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"], phrases=["project starlight"]),
        action=action,
    )


# --- the engine, on a fake clock --------------------------------------------------------------

START = 100.0
IDENTITY = {"id": "chatcmpl-guard", "created": 100, "model": "m"}


def engine(*rules: BoundRule) -> StreamGuard:
    return StreamGuard(rules, start=START, identity=IDENTITY)


def wire(outputs: Sequence[Output]) -> list[ClientEvent]:
    return split_events(b"".join(output.data for output in outputs if isinstance(output, SendBytes)))


def endings(outputs: Sequence[Output]) -> list[Ended]:
    return [output for output in outputs if isinstance(output, Ended)]


def timeout_codes(outputs: Sequence[Output]) -> list[str]:
    return [output.detail for output in outputs if isinstance(output, Intervention) and output.channel == "stream"]


def error_of(events: Sequence[ClientEvent]) -> dict[str, Any]:
    errors = [event.json["error"] for event in events if event.data not in (None, "[DONE]") and "error" in event.json]
    assert len(errors) == 1, events
    error: dict[str, Any] = errors[0]
    return error


def test_without_a_first_token_limit_the_idle_clock_counts_from_the_request_start() -> None:
    guard = engine(idle_rule(Action.ABORT, seconds=2))
    assert guard.deadline == START + 2
    assert guard.expire(START + 1.999) == []
    outputs = guard.expire(START + 2)
    assert timeout_codes(outputs) == ["idle_timeout"]
    assert endings(outputs) == [Ended(Outcome.TIMEOUT, "stalled")]


def test_a_first_token_limit_governs_until_the_first_text_then_the_idle_limit_takes_over() -> None:
    guard = engine(idle_rule(Action.ABORT, seconds=30, first_token_seconds=1))
    assert guard.deadline == START + 1  # not START + 30: the idle limit waits for the first text
    guard.feed(CHAT.role(), START + 0.2)
    assert guard.deadline == START + 1, "a role chunk with empty content is not a first token"
    guard.feed(CHAT.content("Hi"), START + 0.5)
    assert guard.deadline == START + 30.5
    assert guard.expire(START + 1) == []  # the first-token limit was met
    guard.feed(CHAT.content(" there"), START + 10)
    assert guard.deadline == START + 40
    assert timeout_codes(guard.expire(START + 40)) == ["idle_timeout"]


def test_the_first_token_limit_ends_the_stream_with_an_error_event_the_sdk_raises() -> None:
    guard = engine(idle_rule(Action.ABORT, seconds=30, first_token_seconds=1))
    outputs = guard.expire(START + 1)
    assert timeout_codes(outputs) == ["first_token_timeout"]
    assert endings(outputs) == [Ended(Outcome.TIMEOUT, "stalled")]
    assert isinstance(outputs[-1], Ended), "the bytes come before the ending"
    events = wire(outputs)
    assert len(events) == 1 and not any(event.is_done for event in events)
    error = error_of(events)
    assert error["code"] == "first_token_timeout"
    assert error["type"] == "timeout"
    assert error["param"] is None
    assert "stalled" in error["message"]


@pytest.mark.parametrize(
    "filler",
    [KEEP_ALIVE, b": ping\n\n", CHAT.content(""), CHAT.chunk([{"index": 0, "delta": {}, "finish_reason": None}])],
    ids=["keep-alive", "bare-comment", "empty-content", "empty-delta"],
)
def test_comments_and_empty_deltas_do_not_reset_the_idle_clock(filler: bytes) -> None:
    guard = engine(idle_rule(Action.ABORT, seconds=1))
    guard.feed(CHAT.role() + CHAT.content("Hello"), START + 0.5)
    assert guard.deadline == START + 1.5
    for tick in range(1, 10):
        passed = guard.feed(filler, START + 0.5 + tick * 0.1)
        assert [output.data for output in passed if isinstance(output, SendBytes)] == [filler]
        assert guard.deadline == START + 1.5
    assert timeout_codes(guard.expire(START + 1.5)) == ["idle_timeout"]


def test_the_total_limit_cuts_a_steady_stream() -> None:
    guard = engine(idle_rule(Action.ABORT, seconds=1, total_seconds=2.5))
    for step in range(1, 4):
        guard.feed(CHAT.content("tick "), START + step * 0.8)
    assert guard.deadline == START + 2.5  # the total limit comes before the idle one (3.4)
    assert guard.expire(START + 2.49) == []
    outputs = guard.expire(START + 2.5)
    assert timeout_codes(outputs) == ["total_timeout"]
    assert error_of(wire(outputs))["code"] == "total_timeout"


def test_a_timeout_fires_once_and_there_is_no_deadline_after_the_end() -> None:
    guard = engine(idle_rule(Action.ABORT, seconds=1, first_token_seconds=0.5, total_seconds=2))
    assert timeout_codes(guard.expire(START + 5)) == ["first_token_timeout"]
    assert guard.ended
    assert guard.deadline is None
    assert guard.expire(START + 6) == []
    assert guard.feed(CHAT.content("late"), START + 6) == []
    assert guard.close(START + 6) == []


def test_a_stream_that_completes_has_no_deadline() -> None:
    guard = engine(idle_rule(Action.ABORT, seconds=1))
    guard.feed(b"".join(CHAT.stream(["Hi"])), START + 0.1)
    guard.close(START + 0.2)
    assert guard.deadline is None
    assert guard.expire(START + 10) == []


def test_a_guard_without_timed_rules_has_no_deadline() -> None:
    assert engine(phrase_rule()).deadline is None


def test_a_fallback_on_timeout_streams_its_text_then_stop_and_done_with_the_streams_identity() -> None:
    guard = engine(idle_rule(Action.FALLBACK, seconds=1))
    guard.feed(CHAT.role() + CHAT.content("Hello"), START + 0.1)
    outputs = guard.expire(START + 1.1)
    assert endings(outputs) == [Ended(Outcome.TIMEOUT, "stalled")]
    events = wire(outputs)
    assert joined_content(events) == "\n\n" + FALLBACK_TEXT  # after "Hello", the separator
    assert finish_reasons(events) == [(0, "stop")]
    assert events[-1].is_done
    assert {event.json["id"] for event in events if event.is_chunk} == {CHAT.id}


def test_a_fallback_before_the_first_chunk_uses_the_identity_the_shell_gave() -> None:
    guard = engine(idle_rule(Action.FALLBACK, seconds=5, first_token_seconds=1))
    events = wire(guard.expire(START + 1))
    assert joined_content(events) == FALLBACK_TEXT
    assert {event.json["id"] for event in events if event.is_chunk} == {IDENTITY["id"]}
    assert events[-1].is_done


def test_log_on_timeout_records_each_silence_and_changes_nothing() -> None:
    guard = engine(idle_rule(Action.LOG, seconds=1))
    guard.feed(CHAT.role() + CHAT.content("Hello"), START + 0.1)
    outputs = guard.expire(START + 1.1)
    assert outputs == [Intervention("stalled", Action.LOG, "stream", 0, 0, 0, "idle_timeout")]
    assert not guard.ended
    assert guard.expire(START + 1.5) == [], "one silence is recorded once"
    guard.feed(CHAT.content(" again"), START + 2)
    assert guard.deadline == START + 3, "new text re-arms the idle clock"
    assert timeout_codes(guard.expire(START + 3)) == ["idle_timeout"]
    rest = guard.feed(CHAT.finish() + DONE, START + 3.5) + guard.close(START + 3.5)
    assert endings(rest) == [Ended(Outcome.COMPLETED)]


@pytest.mark.parametrize("action", [Action.ABORT, Action.FALLBACK])
def test_text_held_for_a_possible_match_is_released_before_the_timeout_ending(action: Action) -> None:
    guard = engine(phrase_rule(), idle_rule(action, seconds=1))
    first = wire(guard.feed(CHAT.role() + CHAT.content("Our codename is project"), START + 0.1))
    assert joined_content(first) == "Our codename is ", "'project' may start 'project starlight': held"
    events = wire(guard.expire(START + 1.1))
    assert events[0].is_text and joined_content(events[:1]) == "project", "held text goes out first"
    if action is Action.ABORT:
        assert error_of(events[1:])["code"] == "idle_timeout"
    else:
        assert joined_content(events[1:]) == "\n\n" + FALLBACK_TEXT
        assert finish_reasons(events) == [(0, "stop")]
        assert events[-1].is_done


def test_held_text_that_turns_out_to_match_is_not_released_at_the_timeout() -> None:
    key = "sk-" + "A1b2C3d4E5f6G7h8I9j0K1"
    guard = engine(phrase_rule(), idle_rule(Action.ABORT, seconds=1))
    first = wire(guard.feed(CHAT.role() + CHAT.content("The key is " + key), START + 0.1))
    assert joined_content(first) == "The key is "
    outputs = guard.expire(START + 1.1)
    assert key[:3] not in b"".join(event.raw for event in wire(outputs)).decode()
    assert guard.ended and guard.deadline is None
    assert len(endings(outputs)) == 1


# --- end to end: uvicorn and the openai SDK ---------------------------------------------------


def guarded_generator_app(
    generate: Callable[[], AsyncIterator[bytes]], *rules: BoundRule
) -> tuple[ASGIApp, CollectorRegistry]:
    """A Starlette streaming app with the guard where ``add_middleware`` puts it.

    The app is told the server speaks ASGI 2.4, so Starlette's ``StreamingResponse`` does not stop
    its generator on a disconnect by itself (it does under 2.3): only the guard can stop it.
    """
    registry = CollectorRegistry()
    guard = Middleware(GuardrailMiddleware, rules=RuleSet.from_rules(rules), metrics=GuardMetrics(registry))
    spec_2_4 = Middleware(with_spec_version, spec_version="2.4")
    return generator_app(generate, middleware=[guard, spec_2_4]), registry


async def waited(event: threading.Event, seconds: float) -> bool:
    """Wait for an event set in the server's thread, without blocking the test's event loop."""
    return await anyio.to_thread.run_sync(event.wait, seconds)


async def sample_eventually(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float | None:
    """The sample once the server thread has counted it (it counts after the body is sent), or None."""
    with anyio.move_on_after(5):
        while (value := registry.get_sample_value(name, labels)) is None or value == 0:
            await anyio.sleep(0.01)
    return registry.get_sample_value(name, labels)


def streams_ended(outcome: str) -> tuple[str, dict[str, str]]:
    return "guardrail_streams_total", {"dialect": "openai_chat", "outcome": outcome}


def interventions(rule: str, action: str) -> tuple[str, dict[str, str]]:
    return "guardrail_interventions_total", {"rule": rule, "action": action}


@pytest.mark.anyio
@pytest.mark.parametrize("filler", [KEEP_ALIVE, CHAT.content("")], ids=["keep-alive-comments", "empty-content-deltas"])
async def test_silence_behind_keep_alives_gets_the_fallback_about_one_second_after_the_last_delta(
    filler: bytes,
) -> None:
    log = ThreadLog()

    async def answer() -> AsyncIterator[bytes]:
        try:
            yield CHAT.role()
            for delta in THREE_DELTAS:
                yield CHAT.content(delta)
            while True:  # a stalled model behind a proxy that keeps the connection warm
                await anyio.sleep(0.2)
                log.sent.append(filler)
                yield filler
        except BaseException:
            log.cancelled.set()
            raise
        finally:
            log.closed.set()

    app, registry = guarded_generator_app(answer, idle_rule(Action.FALLBACK, seconds=1))
    with anyio.fail_after(30), serve_in_thread(app, lifespan="off") as url:
        received = await stream_with_sdk(url)
        assert received.error is None
        assert [text for _, text in received.pieces] == [*THREE_DELTAS, "\n\n" + FALLBACK_TEXT]
        assert received.finish_reasons == ["stop"]
        gap = received.arrival("\n\n" + FALLBACK_TEXT) - received.arrival(THREE_DELTAS[-1])
        assert 0.8 <= gap <= 4.0, f"the fallback came {gap:.2f} s after the last delta"
        assert len(log.sent) >= 3, "the app kept the connection busy during the silence"
        assert await waited(log.closed, 5), "the app's generator was never closed"
        assert await sample_eventually(registry, *streams_ended("timeout")) == 1.0
        assert registry.get_sample_value(*interventions("stalled", "fallback")) == 1.0


class SlowFirstTokenApp:
    """A raw ASGI app that waits 20 s before its first delta, after or before starting its response."""

    def __init__(self, *, start_first: bool) -> None:
        self.start_first = start_first
        self.log = ThreadLog()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: Message = {"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)}
        try:
            if self.start_first:
                await send(start)
            await anyio.sleep(20)  # cancellable, as a real upstream read is
            if not self.start_first:
                await send(start)
            for body in CHAT.stream(["Too late."]):
                await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            self.log.exhausted.set()
        except BaseException:
            self.log.cancelled.set()
            raise
        finally:
            self.log.closed.set()


@pytest.mark.anyio
@pytest.mark.parametrize("start_first", [True, False], ids=["response-started", "response-not-started"])
async def test_a_first_token_timeout_raises_api_error_with_its_code_and_cancels_the_app(start_first: bool) -> None:
    app = SlowFirstTokenApp(start_first=start_first)
    registry = CollectorRegistry()
    guarded = GuardrailMiddleware(
        app,
        rules=RuleSet.from_rules([idle_rule(Action.ABORT, seconds=30, first_token_seconds=1)]),
        metrics=GuardMetrics(registry),
    )
    with anyio.fail_after(30), serve_in_thread(guarded, lifespan="off") as url:
        received = await stream_with_sdk(url)
        error = received.error
        assert error is not None, "the SDK did not raise"
        assert type(error) is openai.APIError
        assert not isinstance(error, openai.APIConnectionError)
        assert error.code == "first_token_timeout"
        assert error.type == "timeout"
        assert received.error_at is not None
        elapsed = received.error_at - received.started
        assert 0.8 <= elapsed < 5.0, f"raised after {elapsed:.2f} s"
        assert received.pieces == []
        assert await waited(app.log.closed, 5), "the app was not stopped"
        assert app.log.cancelled.is_set() and not app.log.exhausted.is_set()
        assert await sample_eventually(registry, *streams_ended("timeout")) == 1.0


@pytest.mark.anyio
async def test_the_total_limit_cuts_a_slow_but_steady_stream_with_total_timeout() -> None:
    log = ThreadLog()

    async def answer() -> AsyncIterator[bytes]:
        try:
            yield CHAT.role()
            while True:  # never silent for long, but never done
                yield CHAT.content("tick ")
                await anyio.sleep(0.1)
        finally:
            log.closed.set()

    app, registry = guarded_generator_app(answer, idle_rule(Action.ABORT, seconds=5, total_seconds=1.5))
    with anyio.fail_after(30), serve_in_thread(app, lifespan="off") as url:
        received = await stream_with_sdk(url)
        assert received.error is not None and not isinstance(received.error, openai.APIConnectionError)
        assert received.error.code == "total_timeout"
        assert received.error_at is not None
        elapsed = received.error_at - received.started
        assert 1.2 <= elapsed < 5.0, f"cut after {elapsed:.2f} s"
        assert received.text.startswith("tick tick ")
        assert await waited(log.closed, 5)
        assert await sample_eventually(registry, *streams_ended("timeout")) == 1.0


def paced_answer(pauses: Sequence[float], log: ThreadLog) -> Callable[[], AsyncIterator[bytes]]:
    """One delta, then for each pause: keep-alives through the pause and one more delta; then the end."""

    async def answer() -> AsyncIterator[bytes]:
        try:
            yield CHAT.role()
            yield CHAT.content("delta 0. ")
            for number, pause in enumerate(pauses, start=1):
                with anyio.move_on_after(pause):
                    while True:
                        await anyio.sleep(0.1)
                        yield KEEP_ALIVE
                yield CHAT.content(f"delta {number}. ")
            yield CHAT.finish()
            yield DONE
            log.exhausted.set()
        finally:
            log.closed.set()

    return answer


@pytest.mark.anyio
async def test_log_records_an_idle_timeout_and_the_stream_completes_untouched() -> None:
    log = ThreadLog()
    app, registry = guarded_generator_app(paced_answer([1.5], log), idle_rule(Action.LOG, seconds=0.5))
    with anyio.fail_after(30), serve_in_thread(app, lifespan="off") as url:
        received = await stream_with_sdk(url)
        assert received.error is None
        assert received.text == "delta 0. delta 1. "
        assert received.finish_reasons == ["stop"]
        assert await waited(log.exhausted, 5)
        assert await sample_eventually(registry, *streams_ended("completed")) == 1.0
        assert registry.get_sample_value(*interventions("stalled", "log")) == 1.0


@pytest.mark.anyio
async def test_log_records_every_silence_not_only_the_first() -> None:
    log = ThreadLog()
    app, registry = guarded_generator_app(paced_answer([1.5, 1.5], log), idle_rule(Action.LOG, seconds=0.5))
    with anyio.fail_after(30), serve_in_thread(app, lifespan="off") as url:
        received = await stream_with_sdk(url)
        assert received.text == "delta 0. delta 1. delta 2. "
        assert await sample_eventually(registry, *streams_ended("completed")) == 1.0
        # Each silence is longer than the limit, and IdleTimer re-arms on new text.
        assert registry.get_sample_value(*interventions("stalled", "log")) == 2.0


class SlowStartApp:
    """A raw ASGI app that thinks for ``wait`` seconds, then starts its response and streams a short answer."""

    def __init__(self, *, wait: float) -> None:
        self.wait = wait

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(self.wait)
        await send({"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)})
        for body in CHAT.stream(["Slow but fine."]):
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@pytest.mark.anyio
async def test_a_logged_first_token_timeout_before_the_response_starts_leaves_the_stream_intact() -> None:
    app = SlowStartApp(wait=1.5)
    registry = CollectorRegistry()
    guarded = GuardrailMiddleware(
        app,
        rules=RuleSet.from_rules([idle_rule(Action.LOG, seconds=30, first_token_seconds=0.5)]),
        metrics=GuardMetrics(registry),
    )
    with anyio.fail_after(30), serve_in_thread(guarded, lifespan="off") as url:
        received = await stream_with_sdk(url)
        assert received.error is None, f"the SDK raised {received.error!r}"
        assert received.text == "Slow but fine."
        assert received.finish_reasons == ["stop"]
        assert await sample_eventually(registry, *streams_ended("completed")) == 1.0
        assert registry.get_sample_value(*interventions("stalled", "log")) == 1.0
        assert registry.get_sample_value("guardrail_active_streams") == 0.0


# --- concurrency: one send at a time ---------------------------------------------------------


class ExclusiveSend:
    """A downstream ``send`` that notes every call entered while another call is still inside it.

    Every call holds a checkpoint before returning; calls for which ``is_slow`` is true stay inside
    for ``hold`` seconds, long enough for a deadline to pass while the app is mid-send.
    """

    def __init__(self, is_slow: Callable[[Message], bool], hold: float) -> None:
        self.is_slow = is_slow
        self.hold = hold
        self.lock = anyio.Lock()
        self.recorder = Recorder()
        self.overlaps: list[Message] = []

    async def __call__(self, message: Message) -> None:
        try:
            self.lock.acquire_nowait()
        except anyio.WouldBlock:
            self.overlaps.append(message)  # reported by the test, so that it fails with the message in hand
            await self.recorder(message)
            return
        try:
            await self.recorder(message)
            if self.is_slow(message):
                await anyio.sleep(self.hold)
            else:
                await anyio.lowlevel.checkpoint()
        finally:
            self.lock.release()


def is_keep_alive(message: Message) -> bool:
    return message["type"] == "http.response.body" and bytes(message.get("body", b"")) == KEEP_ALIVE


def is_start(message: Message) -> bool:
    return bool(message["type"] == "http.response.start")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("rule", "is_slow", "code"),
    [
        (idle_rule(Action.ABORT, seconds=0.05), is_keep_alive, "idle_timeout"),
        (idle_rule(Action.ABORT, seconds=5, first_token_seconds=0.05), is_start, "first_token_timeout"),
    ],
    ids=["idle-deadline-during-a-body-send", "first-token-deadline-during-the-response-start"],
)
async def test_a_deadline_passing_during_an_app_send_never_overlaps_it(
    rule: BoundRule, is_slow: Callable[[Message], bool], code: str
) -> None:
    app = EndlessApp([CHAT.role(), CHAT.content("Hello")] if code == "idle_timeout" else [], KEEP_ALIVE)
    send = ExclusiveSend(is_slow, hold=0.3)  # 6x the limit: the deadline surely passes inside the send
    guarded = GuardrailMiddleware(app, rules=RuleSet.from_rules([rule]), metrics=GuardMetrics(CollectorRegistry()))
    with anyio.fail_after(10):
        await guarded(http_scope(), Receiver(), send)
        await app.log.finished.wait()
    assert send.overlaps == []
    assert app.log.cancelled
    recorder = send.recorder
    recorder.assert_ended_cleanly()
    assert error_of(recorder.events)["code"] == code
    assert recorder.events[-1].data is not None and json.loads(recorder.events[-1].data)["error"]["code"] == code


def test_the_first_delta_brings_a_sooner_idle_deadline_forward(tmp_path: Path) -> None:
    """A 30 s first-token limit gives way to a 1 s idle limit at the first delta: the watcher wakes for it."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\n"
        "rules:\n"
        "  - {name: stalled, type: idle_timeout, seconds: 1, first_token_seconds: 30, action: fallback,"
        " fallback: retry}\n"
        f"fallbacks:\n  retry: {{text: {FALLBACK_TEXT!r}}}\n"
    )
    app = build_app(
        ServeSettings(rules=(str(rules),), upstream=None),
        rules=load_rules(rules),
        registry=CollectorRegistry(),
        model=DemoModel(seconds_per_token=0.01, keepalive_seconds=0.2),  # paced: the watcher sleeps first
    )
    with serve_in_thread(app) as url, openai.OpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0) as client:
        started = time.monotonic()
        stream = client.chat.completions.create(
            model="m", stream=True, messages=[{"role": "user", "content": "Can you stall?"}], timeout=20
        )
        text = "".join(choice.delta.content or "" for chunk in stream for choice in chunk.choices)
        elapsed = time.monotonic() - started
    assert text.endswith(FALLBACK_TEXT)
    assert elapsed < 10, f"the fallback came after {elapsed:.1f} s: the 30 s first-token deadline was kept"


@pytest.mark.anyio
@pytest.mark.parametrize("timed", [True, False], ids=["idle limit armed", "no time limit"])
async def test_a_guarded_stream_adds_one_task_and_none_per_deadline(timed: bool) -> None:
    # Thousands of streams stay open at once: beside the request's own task, a guarded stream
    # runs only the disconnect listener; a time limit is an event-loop timer, not a task.
    counted: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)})
        for body in CHAT.stream(["One ", "two."]):
            await send({"type": "http.response.body", "body": body, "more_body": True})
            await anyio.sleep(0.01)
            counted.append(len(asyncio.all_tasks()))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    rules = (
        [idle_rule(Action.ABORT, seconds=5)]
        if timed
        else [BoundRule("secrets", BannedPatterns(phrases=["x y"]), Action.ABORT)]
    )
    wrapped = GuardrailMiddleware(app, rules=RuleSet.from_rules(rules), metrics=GuardMetrics(CollectorRegistry()))
    with anyio.fail_after(10):
        for target in (app, wrapped):
            recorder = Recorder()
            await target(http_scope(), Receiver(), recorder)
            assert recorder.completed.is_set()
    bare, guarded = counted[: len(counted) // 2], counted[len(counted) // 2 :]
    assert [count - 1 for count in guarded] == bare


@pytest.mark.anyio
async def test_a_timer_that_fires_early_by_the_guards_clock_is_set_again_not_spun(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The event loop's clock may run ahead of the guard's finer one (uvloop's has millisecond
    # resolution), so a deadline timer can fire before the deadline by the guard's clock. It is
    # then set again a millisecond on, not re-fired at once, over and over, until the clocks agree.
    class LaggingClock(RequestClock):
        __slots__ = ()

        def __call__(self) -> float:
            return super().__call__() - 0.005  # 5 ms behind the loop

    fired = 0
    deadline_passed = middleware._GuardedResponse._deadline_passed

    def counted(self: middleware._GuardedResponse) -> None:
        nonlocal fired
        fired += 1
        deadline_passed(self)

    monkeypatch.setattr(middleware, "RequestClock", LaggingClock)
    monkeypatch.setattr(middleware._GuardedResponse, "_deadline_passed", counted)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)})
        await send({"type": "http.response.body", "body": CHAT.stream(["Hello"])[1], "more_body": True})
        await anyio.sleep(2)  # silent past the idle limit
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    rules = RuleSet.from_rules([idle_rule(Action.ABORT, seconds=0.2)])
    wrapped = GuardrailMiddleware(app, rules=rules, metrics=GuardMetrics(CollectorRegistry()))
    recorder = Recorder()
    with anyio.fail_after(5):
        await wrapped(http_scope(), Receiver(), recorder)
    assert b"idle_timeout" in b"".join(message.get("body", b"") for message in recorder.messages)
    assert 1 <= fired <= 8, fired  # (spinning, it fires hundreds of times in those 5 ms)


WHOLE_ANSWER = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "A long answer."}, "finish_reason": "stop"}
        ],
    }
).encode()


def whole_answer_app(*, think: float, stall: float) -> ASGIApp:
    """A JSON answer: ``think`` seconds before it starts, its body in two parts ``stall`` seconds apart."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await anyio.sleep(think)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": WHOLE_ANSWER[:30], "more_body": True})
        await anyio.sleep(stall)
        await send({"type": "http.response.body", "body": WHOLE_ANSWER[30:], "more_body": False})

    return app


async def answer_to(app: ASGIApp, *, stream: bool, limits: BoundRule) -> tuple[int, dict[str, Any]]:
    wrapped = GuardrailMiddleware(app, rules=RuleSet.from_rules([limits]), metrics=GuardMetrics(CollectorRegistry()))
    recorder = Recorder()
    request = json.dumps({"model": "m", "messages": [], "stream": stream}).encode()
    with anyio.fail_after(10):
        await wrapped(http_scope(), Receiver(request), recorder)
    start, *bodies = recorder.messages
    assert dict(start["headers"])[b"content-type"] == b"application/json"
    return start["status"], json.loads(b"".join(body.get("body", b"") for body in bodies))


@pytest.mark.anyio
async def test_a_whole_answer_is_not_held_to_time_limits_while_the_model_writes_it() -> None:
    # "stream": false: nothing arrives until the model has written the whole answer, which may
    # take far longer than an idle or first-token limit; its body arriving in parts is no stall.
    app = whole_answer_app(think=0.5, stall=0.05)
    status, body = await answer_to(
        app, stream=False, limits=idle_rule(Action.ABORT, seconds=0.2, first_token_seconds=0.2)
    )
    assert (status, body) == (200, json.loads(WHOLE_ANSWER))


@pytest.mark.anyio
async def test_a_whole_answer_that_stalls_inside_its_body_ends_with_a_504() -> None:
    app = whole_answer_app(think=0.0, stall=2.0)
    status, body = await answer_to(
        app, stream=False, limits=idle_rule(Action.ABORT, seconds=0.2, first_token_seconds=0.2)
    )
    assert status == 504
    assert body["error"]["code"] in ("idle_timeout", "first_token_timeout")


@pytest.mark.anyio
async def test_a_stream_request_answered_as_json_that_never_starts_its_body_gets_a_json_504() -> None:
    # The client asked for a stream, so its first-token limit counts from the request; the answer's
    # headers said JSON, so the ending is the JSON error they promise, not event-stream bytes.
    async def silent_after_start(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await anyio.sleep(2)  # (the guard ends the answer and stops the app before this is over)

    status, body = await answer_to(
        silent_after_start, stream=True, limits=idle_rule(Action.ABORT, seconds=0.3, first_token_seconds=0.2)
    )
    assert status == 504
    assert body["error"]["code"] == "first_token_timeout"


def stalling_app(after_stall: str) -> ASGIApp:
    """One delta, then silence past the idle limit; then the app returns, fails, or streams on."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)})
        await send({"type": "http.response.body", "body": CHAT.stream(["Hello"])[1], "more_body": True})
        await anyio.sleep(0.25)  # past the 0.2 s limit: the ending is being written now
        if after_stall == "fails":
            raise ConnectionError("upstream reset")
        while after_stall == "streams on":
            await send({"type": "http.response.body", "body": CHAT.stream([" more"])[1], "more_body": True})
            await anyio.sleep(0.01)

    return app


@pytest.mark.anyio
@pytest.mark.parametrize("after_stall", ["returns", "fails"])
async def test_an_ending_being_written_when_the_app_stops_goes_out_whole_and_once(after_stall: str) -> None:
    bodies: list[Message] = []

    async def slow_client(message: Message) -> None:
        if bodies and not bodies[-1].get("more_body", False):
            raise RuntimeError("a message after the response was complete")  # as uvicorn does
        if message["type"] == "http.response.body":
            if b"idle_timeout" in message.get("body", b""):
                await anyio.sleep(0.1)  # a socket write under back-pressure
            bodies.append(message)

    wrapped = GuardrailMiddleware(
        stalling_app(after_stall),
        rules=RuleSet.from_rules([idle_rule(Action.ABORT, seconds=0.2)]),
        metrics=GuardMetrics(CollectorRegistry()),
    )
    with anyio.fail_after(5):
        try:
            await wrapped(http_scope(), Receiver(), slow_client)
        except ConnectionError:
            assert after_stall == "fails"  # the app's own exception, once the client has its ending
    assert [message.get("more_body", False) for message in bodies] == [True, False]
    assert b"idle_timeout" in bodies[-1]["body"]


@pytest.mark.anyio
async def test_a_server_send_that_fails_with_the_ending_stops_the_app_and_fails_the_request() -> None:
    sent_after: list[float] = []
    app = stalling_app("streams on")

    async def counting_app(scope: Scope, receive: Receive, send: Send) -> None:
        async def counted(message: Message) -> None:
            if message.get("body", b"").count(b"more"):
                sent_after.append(time.monotonic())
            await send(message)

        await app(scope, receive, counted)

    async def broken_client(message: Message) -> None:
        if b"idle_timeout" in message.get("body", b""):
            raise RuntimeError("the server's send failed")

    registry = CollectorRegistry()
    wrapped = GuardrailMiddleware(
        counting_app, rules=RuleSet.from_rules([idle_rule(Action.ABORT, seconds=0.2)]), metrics=GuardMetrics(registry)
    )
    with anyio.fail_after(5), pytest.raises(RuntimeError, match="send failed"):
        await wrapped(http_scope(), Receiver(), broken_client)
    assert sent_after == []  # stopped at the deadline, not left streaming into nothing
    assert registry.get_sample_value("guardrail_active_streams") == 0.0


@pytest.mark.anyio
async def test_a_server_receive_that_fails_stops_the_app_and_fails_the_request() -> None:
    calls = 0

    async def broken_receive() -> Message:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b'{"model":"m","messages":[],"stream":true}', "more_body": False}
        await anyio.sleep(0.05)
        raise RuntimeError("the server's receive failed")

    registry = CollectorRegistry()
    wrapped = GuardrailMiddleware(
        stalling_app("streams on"),
        rules=RuleSet.from_rules([idle_rule(Action.ABORT, seconds=5)]),
        metrics=GuardMetrics(registry),
    )
    with anyio.fail_after(5), pytest.raises(RuntimeError, match="receive failed"):
        await wrapped(http_scope(), broken_receive, Recorder())
    assert registry.get_sample_value("guardrail_active_streams") == 0.0
