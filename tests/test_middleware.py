"""GuardrailMiddleware through a raw ASGI harness: every message the client would get is recorded.

No server: the scope, ``receive`` and ``send`` are built by hand (tests/apps.py). Apps that must
be watched delta by delta are :class:`~tests.apps.SteppedApp`s, which send one message per step,
so each test looks at the client's view between deltas. Order is forced with ``anyio.Event``.
"""

from __future__ import annotations

import gc
import gzip
import json
import tracemalloc
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
import pytest
from prometheus_client import CollectorRegistry
from starlette.middleware import Middleware

from guardrail._types import ASGIApp, Message, Receive, Scope, Send
from guardrail.asgi import GuardrailMiddleware
from guardrail.config import RuleSet
from guardrail.core.rule import Action, BoundRule, Fallback
from guardrail.metrics import GuardMetrics
from guardrail.rules.banned import BannedPatterns
from tests.apps import (
    CHAT_PATH,
    DONE,
    JSON_HEADERS,
    KEEP_ALIVE,
    SSE_HEADERS,
    AppLog,
    Call,
    ChatChunks,
    ClientEvent,
    EndlessApp,
    Receiver,
    Recorder,
    SteppedApp,
    endless_streaming_response_app,
    finish_reasons,
    generator_app,
    http_scope,
    joined_content,
    replay_app,
    split_events,
)

pytestmark = pytest.mark.anyio

KEY_PATTERN = r"(?<![A-Za-z0-9])sk-[A-Za-z0-9]{20,}"
PHRASE = "project starlight"
KEY = "sk-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5"
FALLBACK = Fallback(name="sorry", text="Sorry, I can't share that.")
CHAT = ChatChunks()


def secrets_rule(action: Action, *, replacement: str = "[redacted]", phrases: Sequence[str] = (PHRASE,)) -> BoundRule:
    return BoundRule(
        name="secrets",
        rule=BannedPatterns(patterns=[KEY_PATTERN], phrases=phrases),
        action=action,
        replacement=replacement,
        fallback=FALLBACK if action is Action.FALLBACK else None,
    )


def guarded(app: ASGIApp, *rules: BoundRule, paths: Sequence[str] = ()) -> GuardrailMiddleware:
    return GuardrailMiddleware(app, rules=RuleSet.from_rules(rules or [secrets_rule(Action.ABORT)], paths=paths))


@asynccontextmanager
async def running(
    app: ASGIApp, send: Send, scope: Scope | None = None, receive: Receive | None = None
) -> AsyncIterator[Call]:
    """Run one ASGI call beside the test; leaving the block waits for it to return."""
    call = Call()
    async with anyio.create_task_group() as group:
        group.start_soon(call.run, app, scope or http_scope(), receive or Receiver(), send)
        yield call


def data_events(events: Sequence[ClientEvent]) -> list[ClientEvent]:
    return [event for event in events if event.data is not None]


def non_text_events(events: Sequence[ClientEvent]) -> list[bytes]:
    return [event.raw for event in events if not event.is_text]


# --- acceptance 2: nothing that cannot start a match is delayed --------------------------------


async def test_text_that_cannot_start_a_match_is_released_in_the_delta_that_brought_it() -> None:
    deltas = ["The ", "weather ", "in Paris ", "is ", "sunny, ", "as forecast ", "today."]
    app = SteppedApp(CHAT.stream(deltas))
    recorder = Recorder()
    with anyio.fail_after(5):
        async with running(guarded(app), recorder):
            await app.step()  # the role chunk
            for number in range(1, len(deltas) + 1):
                await app.step()
                assert recorder.content == "".join(deltas[:number]), f"after delta {number}"
                # Released whole, so it went out as the app's own bytes.
                assert recorder.body == b"".join(app.bodies[: number + 1])
            await app.run_to_end()
    recorder.assert_ended_cleanly()
    assert recorder.body == b"".join(app.bodies)


@pytest.mark.parametrize(
    ("deltas", "client_after_each"),
    [
        # A word starting with "p" could be "project starlight"; a lone "s" could be "sk-...".
        (["Our p", "lan is s", "imple."], ["Our ", "Our plan is ", "Our plan is simple."]),
        (["The project ", "plan works."], ["The ", "The project plan works."]),
        (["Use sk-", "etch", " now."], ["Use ", "Use ", "Use sk-etch now."]),
        (["Project ", "Starling", " is a bird."], ["", "Project Starling", "Project Starling is a bird."]),
    ],
    ids=["p-and-s", "project-then-plan", "sk-then-not-a-key", "project-starling"],
)
async def test_a_possible_match_is_held_exactly_until_the_next_delta_rules_it_out(
    deltas: list[str], client_after_each: list[str]
) -> None:
    app = SteppedApp(CHAT.stream(deltas))
    recorder = Recorder()
    with anyio.fail_after(5):
        async with running(guarded(app), recorder):
            await app.step()  # the role chunk
            for delta, expected in zip(deltas, client_after_each, strict=True):
                before = len(recorder.body_messages)
                released_before = recorder.content
                await app.step()
                assert recorder.content == expected, f"after delta {delta!r}"
                new_messages = recorder.body_messages[before:]
                if expected != released_before:
                    # Held text goes out together with the delta that cleared it, in one message.
                    assert len(new_messages) == 1
                    assert (
                        joined_content(split_events(bytes(new_messages[0]["body"]))) == expected[len(released_before) :]
                    )
            await app.run_to_end()
    recorder.assert_ended_cleanly()
    assert recorder.content == "".join(deltas)
    assert finish_reasons(recorder.events) == [(0, "stop")]
    assert recorder.events[-1].is_done


async def test_a_key_fed_one_character_per_delta_never_reaches_the_client() -> None:
    before_key = "Here is my key: "
    deltas = [before_key, *KEY, *" and that is all."]
    app = SteppedApp(CHAT.stream(deltas))
    recorder = Recorder()
    with anyio.fail_after(5):
        async with running(guarded(app), recorder) as call:
            await app.step()  # the role chunk
            for number, delta in enumerate(deltas):
                if recorder.completed.is_set():
                    break
                await app.step()
                assert before_key.startswith(recorder.content), f"after delta {number} ({delta!r})"
                if number == 0:
                    assert recorder.content == before_key  # nothing before the key is delayed
            await call.returned.wait()
    recorder.assert_ended_cleanly()
    assert recorder.content == before_key
    assert finish_reasons(recorder.events) == [(0, "content_filter")]
    assert recorder.events[-1].is_done
    assert app.log.cancelled


# --- acceptance 4: abort and fallback stop the app ---------------------------------------------

HEAD = [CHAT.role(), CHAT.content("Here is the key: "), CHAT.content(KEY[:10]), CHAT.content(KEY[10:] + " and more")]
TAIL = CHAT.content("more words ")


@pytest.mark.parametrize("action", [Action.ABORT, Action.FALLBACK])
@pytest.mark.parametrize("kind", ["raw", "streaming-response", "streaming-response-asgi-2.0"])
async def test_abort_and_fallback_close_the_app_and_stop_its_deltas(action: Action, kind: str) -> None:
    log = AppLog()
    app: ASGIApp
    if kind == "raw":
        endless = EndlessApp(HEAD, TAIL)
        app, log = endless, endless.log
    else:
        app = endless_streaming_response_app(HEAD, TAIL, log)
    scope = http_scope(spec_version="2.0" if kind.endswith("2.0") else "2.4")
    recorder = Recorder()
    attempted_when_complete: list[int] = []

    async def send(message: Message) -> None:
        await recorder(message)
        if recorder.completed.is_set() and not attempted_when_complete:
            attempted_when_complete.append(len(log.attempted))

    with anyio.fail_after(5):
        async with running(guarded(app, secrets_rule(action)), send, scope) as call:
            await log.finished.wait()
            await call.returned.wait()
    assert log.cancelled, "the app was not cancelled"
    assert attempted_when_complete == [len(log.attempted)], "the app sent deltas after the stream was ended"
    # The key is final once the delta after it arrives: that is the last delta the app sends.
    assert log.attempted == HEAD
    recorder.assert_ended_cleanly()
    events = recorder.events
    assert events[-1].is_done
    assert b"more words" not in recorder.body
    if action is Action.ABORT:
        assert recorder.content == "Here is the key: "
        assert finish_reasons(events) == [(0, "content_filter")]
    else:
        assert recorder.content == "Here is the key: \n\n" + str(FALLBACK.text)
        assert finish_reasons(events) == [(0, "stop")]


# --- acceptance 5: fidelity when no rule fires -------------------------------------------------


async def test_a_stream_in_which_nothing_was_held_arrives_byte_for_byte() -> None:
    bodies = [
        CHAT.role(),
        CHAT.content("Hello"),
        KEEP_ALIVE,
        CHAT.content(", world. "),
        CHAT.content("Nothing here is secret."),
        CHAT.finish("stop"),
        CHAT.usage(),
        DONE,
    ]
    app = SteppedApp(bodies)
    recorder = Recorder()
    with anyio.fail_after(5):
        async with running(guarded(app), recorder):
            for number in range(1, len(bodies) + 1):
                await app.step()
                assert recorder.body == b"".join(bodies[:number]), f"after body {number}"
            await app.step()  # the end of the body
    recorder.assert_ended_cleanly()
    assert recorder.body == b"".join(bodies)
    assert recorder.start["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in recorder.headers
    assert not app.log.cancelled


async def test_a_send_that_fails_mid_stream_counts_the_client_as_gone_and_stops_the_app() -> None:
    """Some servers report a client that left by raising OSError from ``send``: nothing more goes out."""
    app = EndlessApp([CHAT.role(), CHAT.content("Hello")], CHAT.content(" again"))
    sent: list[Message] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and len(sent) == 2:  # the start and one body went out
            raise OSError("connection reset by peer")
        sent.append(message)

    registry = CollectorRegistry()
    middleware = GuardrailMiddleware(
        app, rules=RuleSet.from_rules([secrets_rule(Action.ABORT)]), metrics=GuardMetrics(registry)
    )
    with anyio.fail_after(5):
        await middleware(http_scope(), Receiver(), send)  # returns quietly
        await app.log.finished.wait()
    assert app.log.cancelled
    assert [m.get("body") for m in sent[1:]] == [CHAT.role()]
    labels = {"dialect": "openai_chat", "outcome": "client_disconnected"}
    assert registry.get_sample_value("guardrail_streams_total", labels) == 1.0


async def test_when_no_rule_fires_the_same_text_and_other_events_arrive_in_order_even_if_text_was_held() -> None:
    bodies = [
        CHAT.role(),
        CHAT.content("Our p"),
        KEEP_ALIVE,
        CHAT.content("lan is s"),
        CHAT.content("imple: "),
        CHAT.content("ship it s"),
        CHAT.finish("stop"),
        CHAT.usage(),
        DONE,
    ]
    recorder = Recorder()
    with anyio.fail_after(5):
        await guarded(replay_app(SteppedApp(bodies).messages))(http_scope(), Receiver(), recorder)
    recorder.assert_ended_cleanly()
    sent = split_events(b"".join(bodies))
    received = recorder.events
    assert recorder.content == joined_content(sent) == "Our plan is simple: ship it s"
    assert non_text_events(received) == non_text_events(sent)
    # Text never moves past the event that ends its choice.
    last_text = max(n for n, event in enumerate(received) if event.is_text)
    assert last_text < received.index(next(e for e in received if finish_reasons([e])))


@pytest.mark.parametrize(
    ("path", "headers", "kept"),
    [
        (CHAT_PATH, SSE_HEADERS, False),
        (CHAT_PATH, JSON_HEADERS, False),  # an event stream labelled JSON is still read (and guarded)
        ("/health", SSE_HEADERS, True),
        (CHAT_PATH, (*SSE_HEADERS, (b"content-encoding", b"gzip")), False),  # decoded, guarded, sent as identity
    ],
    ids=["guarded-stream", "sse-labelled-json", "unguarded-path", "encoded-stream"],
)
async def test_content_length_is_dropped_only_for_guarded_streams(
    path: str, headers: tuple[tuple[bytes, bytes], ...], kept: bool
) -> None:
    body = sent = CHAT.content("Hello") + DONE
    if (b"content-encoding", b"gzip") in headers:
        sent = gzip.compress(body)
    messages: list[Message] = [
        {"type": "http.response.start", "status": 200, "headers": [*headers, (b"content-length", b"%d" % len(sent))]},
        {"type": "http.response.body", "body": sent, "more_body": False},
    ]
    recorder = Recorder()
    with anyio.fail_after(5):
        await guarded(replay_app(messages), paths=["/v1/*"])(http_scope(path), Receiver(), recorder)
    assert ((b"content-length", b"%d" % len(sent)) in recorder.headers) is kept
    assert recorder.body == body


# --- pass-through ------------------------------------------------------------------------------


@pytest.mark.parametrize("scope_type", ["lifespan", "websocket"])
async def test_non_http_scopes_reach_the_app_untouched(scope_type: str) -> None:
    seen: list[tuple[Scope, Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send))
        await send({"type": f"{scope_type}.probe", "text": KEY})

    scope: Scope = {"type": scope_type, "asgi": {"version": "3.0"}, "path": CHAT_PATH, "headers": []}
    receive, recorder = Receiver(), Recorder()
    with anyio.fail_after(5):
        await guarded(app)(scope, receive, recorder)
    assert seen == [(scope, receive, recorder)]
    assert seen[0][0] is scope and seen[0][1] is receive and seen[0][2] is recorder
    assert recorder.messages == [{"type": f"{scope_type}.probe", "text": KEY}]


async def test_unguarded_paths_pass_through_untouched() -> None:
    bodies = CHAT.stream([f"the key is {KEY} ", "and the codename is Project Starlight."])
    messages = SteppedApp(bodies, headers=SSE_HEADERS).messages
    recorder = Recorder()
    with anyio.fail_after(5):
        await guarded(replay_app(messages), paths=["/v1/*"])(http_scope("/health"), Receiver(), recorder)
    assert recorder.messages == messages
    assert KEY.encode() in recorder.body


@pytest.mark.parametrize(
    "headers",
    [JSON_HEADERS, ((b"content-type", b"text/plain"),), ((b"content-type", b"application/x-ndjson"),), ()],
    ids=["json", "text", "ndjson", "no-content-type"],
)
async def test_an_event_stream_under_another_label_is_guarded(headers: tuple[tuple[bytes, bytes], ...]) -> None:
    bodies = CHAT.stream([f"the key is {KEY} ", "and the codename is Project Starlight."])
    messages = SteppedApp(bodies, headers=headers).messages
    recorder = Recorder()
    with anyio.fail_after(5):
        await guarded(replay_app(messages), paths=["/v1/*"])(http_scope(CHAT_PATH), Receiver(), recorder)
    assert KEY.encode() not in recorder.body
    assert b"Starlight" not in recorder.body


# --- acceptance 6: multi-byte characters split across body messages ----------------------------

KOREAN = ChatChunks(ensure_ascii=False)


def split_inside_characters(data: bytes) -> list[bytes]:
    """``data`` cut right after the first byte of every multi-byte UTF-8 character."""
    cuts = [n + 1 for n, byte in enumerate(data) if byte >= 0xC0]
    return [data[start:end] for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True)]


async def test_korean_text_split_inside_characters_arrives_intact() -> None:
    deltas = ["안녕하세요. ", "오늘 서울의 ", "날씨는 맑고 ", "따뜻합니다."]
    wire = b"".join(KOREAN.stream(deltas))
    pieces = split_inside_characters(wire)
    assert len(pieces) > 15 and all(0x80 <= piece[0] < 0xC0 for piece in pieces[1:])  # every cut splits a character
    recorder = Recorder()
    with anyio.fail_after(5):
        await guarded(replay_app(SteppedApp(pieces).messages))(http_scope(), Receiver(), recorder)
    recorder.assert_ended_cleanly()
    assert recorder.content == "".join(deltas)
    assert recorder.body == wire


async def test_a_streaming_response_of_memoryviews_is_guarded_like_one_of_bytes() -> None:
    """Starlette's StreamingResponse passes memoryview chunks through to the middleware as they are."""
    parts = CHAT.stream(["Here is ", KEY[:12], KEY[12:], " for you."])

    async def generate() -> AsyncIterator[bytes]:
        for part in parts:
            yield memoryview(part)  # type: ignore[misc]  # what an app may yield

    recorder = Recorder()
    app = generator_app(
        generate, middleware=[Middleware(GuardrailMiddleware, rules=RuleSet.from_rules([secrets_rule(Action.REDACT)]))]
    )
    with anyio.fail_after(5):
        await app(http_scope(), Receiver(), recorder)
    recorder.assert_ended_cleanly()
    assert recorder.content == "Here is [redacted] for you."


async def test_a_korean_banned_phrase_split_inside_characters_is_redacted() -> None:
    deltas = ["요청하신 비", "밀 번호: 1234입니다. ", "다시 말해 비밀", "  번호. 비밀번호는 ", "안전하게 보관하세요."]
    wire = b"".join(KOREAN.stream(deltas))
    rule = BoundRule(
        name="korean-secret", rule=BannedPatterns(phrases=["비밀 번호"]), action=Action.REDACT, replacement="[가림]"
    )
    recorder = Recorder()
    with anyio.fail_after(5):
        await guarded(replay_app(SteppedApp(split_inside_characters(wire)).messages), rule)(
            http_scope(), Receiver(), recorder
        )
    recorder.assert_ended_cleanly()
    # "비밀번호는" has no space inside, so it is not the phrase.
    assert recorder.content == "요청하신 [가림]: 1234입니다. 다시 말해 [가림]. 비밀번호는 안전하게 보관하세요."
    assert finish_reasons(recorder.events) == [(0, "stop")]
    assert recorder.events[-1].is_done


# --- redact and log ------------------------------------------------------------------------------


async def test_redact_replaces_matches_split_across_deltas() -> None:
    deltas = ["My key is sk-", KEY[3:15], KEY[15:] + " and the code", "name is Project", "\nStarlight. Bye."]
    app = SteppedApp(CHAT.stream(deltas))
    recorder = Recorder()
    with anyio.fail_after(5):
        async with running(guarded(app, secrets_rule(Action.REDACT, replacement="[hidden]")), recorder):
            await app.step()
            for _ in deltas:
                await app.step()
                assert KEY[:4] not in recorder.content and "Starl" not in recorder.content
            await app.run_to_end()
    recorder.assert_ended_cleanly()
    assert recorder.content == "My key is [hidden] and the codename is [hidden]. Bye."
    assert finish_reasons(recorder.events) == [(0, "stop")]
    assert recorder.events[-1].is_done
    assert not app.log.cancelled


async def test_log_changes_nothing_byte_for_byte_but_the_rule_fires() -> None:
    registry = CollectorRegistry()
    bodies = CHAT.stream([f"My key is {KEY} and nothing more. ", "The codename is Project Starlight, as agreed."])
    middleware = GuardrailMiddleware(
        replay_app(SteppedApp(bodies).messages),
        rules=RuleSet.from_rules([secrets_rule(Action.LOG)]),
        metrics=GuardMetrics(registry),
    )
    recorder = Recorder()
    with anyio.fail_after(5):
        await middleware(http_scope(), Receiver(), recorder)
    recorder.assert_ended_cleanly()
    assert recorder.body == b"".join(bodies)
    # One hit for the key, one for the phrase.
    assert registry.get_sample_value("guardrail_interventions_total", {"rule": "secrets", "action": "log"}) == 2


async def test_log_keeps_text_that_was_held() -> None:
    deltas = ["My key is sk-", KEY[3:15], KEY[15:] + " and the code", "name is Project", " Starlight"]
    bodies = CHAT.stream(deltas)
    recorder = Recorder()
    with anyio.fail_after(5):
        await guarded(replay_app(SteppedApp(bodies).messages), secrets_rule(Action.LOG))(
            http_scope(), Receiver(), recorder
        )
    recorder.assert_ended_cleanly()
    assert recorder.content == "".join(deltas)
    assert non_text_events(recorder.events) == non_text_events(split_events(b"".join(bodies)))


# --- bad input -----------------------------------------------------------------------------------


def error_codes(events: Sequence[ClientEvent]) -> list[str]:
    return [event.json["error"]["code"] for event in data_events(events) if not event.is_done and "error" in event.json]


async def test_a_malformed_json_event_ends_the_stream_with_an_in_stream_error_and_stops_the_app() -> None:
    bodies = [CHAT.role(), CHAT.content("Hello "), b"data: {not json\n\n", CHAT.content("after"), CHAT.finish(), DONE]
    app = SteppedApp(bodies)
    recorder = Recorder()
    with anyio.fail_after(5):
        async with running(guarded(app), recorder) as call:
            for _ in range(3):
                await app.step()
            assert recorder.completed.is_set(), "the stream was not ended at the malformed event"
            await call.returned.wait()
            await app.log.finished.wait()
    recorder.assert_ended_cleanly()
    assert recorder.content == "Hello "
    assert error_codes(recorder.events) == ["malformed_event"]
    assert recorder.events[-1].json["error"]["code"] == "malformed_event"
    assert app.log.cancelled
    assert app.log.attempted == bodies[:3]


async def test_an_unknown_event_shape_passes_through_untouched() -> None:
    bodies = [
        CHAT.role(),
        CHAT.content("Hello "),
        b'data: {"object":"custom.progress","step":1}\n\n',
        b"data: [1, 2, 3]\n\n",
        CHAT.content("world."),
        CHAT.finish(),
        DONE,
    ]
    recorder = Recorder()
    with anyio.fail_after(5):
        await guarded(replay_app(SteppedApp(bodies).messages))(http_scope(), Receiver(), recorder)
    recorder.assert_ended_cleanly()
    assert recorder.body == b"".join(bodies)


async def test_an_event_over_the_size_cap_ends_the_stream_and_never_hangs() -> None:
    app = EndlessApp(
        [CHAT.role(), CHAT.content("Hello "), b'data: {"choices":[{"index":0,"delta":{"content":"'], b"x" * 65536
    )
    recorder = Recorder()
    attempted_when_complete: list[int] = []

    async def send(message: Message) -> None:
        await recorder(message)
        if recorder.completed.is_set() and not attempted_when_complete:
            attempted_when_complete.append(len(app.log.attempted))

    with anyio.fail_after(5):
        async with running(guarded(app), send) as call:
            await call.returned.wait()
    recorder.assert_ended_cleanly()
    assert recorder.content == "Hello "
    assert error_codes(recorder.events) == ["event_too_large"]
    assert app.log.cancelled and app.log.finished.is_set()
    assert attempted_when_complete == [len(app.log.attempted)]
    assert len(app.log.attempted) < 3 + (2 << 20) // 65536, "the cap let far more than 1 MiB through"


# --- several choices -----------------------------------------------------------------------------


async def test_an_abort_in_one_choice_finishes_every_open_choice_with_content_filter() -> None:
    bodies = [
        CHAT.role(0),
        CHAT.role(1),
        CHAT.content("Alpha ", 0),
        CHAT.content("Beta ", 1),
        CHAT.content("one two ", 0),
        CHAT.content(f"key {KEY} trailing words", 1),
        CHAT.content("three", 0),
        CHAT.finish("stop", 0),
        CHAT.finish("stop", 1),
        DONE,
    ]
    app = SteppedApp(bodies)
    recorder = Recorder()
    with anyio.fail_after(5):
        async with running(guarded(app), recorder) as call:
            for _ in range(6):  # up to the delta that completes the key
                await app.step()
            assert recorder.completed.is_set()
            await call.returned.wait()
    recorder.assert_ended_cleanly()
    events = recorder.events
    assert joined_content(events, 0) == "Alpha one two "
    assert joined_content(events, 1) == "Beta key "
    assert sorted(finish_reasons(events)) == [(0, "content_filter"), (1, "content_filter")]
    assert events[-1].is_done
    assert app.log.cancelled


async def test_an_abort_after_one_choice_has_finished_ends_only_the_open_choice() -> None:
    bodies = [
        CHAT.role(0),
        CHAT.role(1),
        CHAT.content("Alpha.", 0),
        CHAT.finish("stop", 0),
        CHAT.content(f"key {KEY} trailing words", 1),
        CHAT.finish("stop", 1),
        DONE,
    ]
    recorder = Recorder()
    with anyio.fail_after(5):
        await guarded(replay_app(SteppedApp(bodies).messages))(http_scope(), Receiver(), recorder)
    recorder.assert_ended_cleanly()
    events = recorder.events
    assert joined_content(events, 0) == "Alpha."
    assert joined_content(events, 1) == "key "
    assert finish_reasons(events) == [(0, "stop"), (1, "content_filter")]
    assert events[-1].is_done


@pytest.mark.parametrize("url_fallback", [False, True], ids=["no url fallback", "url fallback"])
async def test_an_open_stream_keeps_the_request_body_only_while_a_url_fallback_may_resend_it(
    url_fallback: bool,
) -> None:
    # A long conversation's body, parsed, would otherwise stay in memory for as long as the answer
    # streams: thousands of open streams times a few hundred KiB each.
    messages = [{"role": "user", "content": "word " * 1000} for _ in range(100)]
    body = json.dumps({"model": "m", "messages": messages, "stream": True}).encode()
    paused, resume = anyio.Event(), anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # (and let go of it)
        await send({"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)})
        await send({"type": "http.response.body", "body": CHAT.stream(["Hello."])[1], "more_body": True})
        paused.set()
        await resume.wait()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    fallback = Fallback("backup", url="http://127.0.0.1:9/v1/chat/completions") if url_fallback else FALLBACK
    rule = BoundRule("secrets", BannedPatterns(phrases=[PHRASE]), Action.FALLBACK, fallback=fallback)
    wrapped = guarded(app, rule)
    recorder = Recorder()
    gc.collect()
    tracemalloc.start()
    try:
        with anyio.fail_after(10):
            async with running(wrapped, recorder, receive=Receiver(body)):
                await paused.wait()
                gc.collect()
                held = tracemalloc.get_traced_memory()[0]
                resume.set()
    finally:
        tracemalloc.stop()
    assert recorder.content == "Hello."
    if url_fallback:
        assert held > len(body)  # kept, to re-send
    else:
        assert held < len(body) // 4
