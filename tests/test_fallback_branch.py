"""Fallback branching: a url fallback's answer streamed after the safe prefix (issue 6, acceptance 3).

The engine's continuation mode is tested byte for byte; the middleware's branch end to end, with
uvicorn servers in threads for the app, the fallback upstream and (through ``guardrail serve``'s
app) the first upstream, and the official openai SDK or raw httpx as the client.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.responses import StreamingResponse

from guardrail._types import Receive, Scope, Send
from guardrail.asgi import GuardrailMiddleware
from guardrail.asgi.branch import CREDENTIAL_ORIGINS_KEY, display_url, fallback_request, origin_of
from guardrail.asgi.record import StreamRecord
from guardrail.asgi.request import ChatRequest
from guardrail.config import RuleSet
from guardrail.core.engine import StreamGuard
from guardrail.core.outputs import Ended, Intervention, Outcome, Send as SendBytes
from guardrail.core.rule import Action, BoundRule, Fallback
from guardrail.metrics import GuardMetrics
from guardrail.proxy.app import ServeSettings, build_app
from guardrail.rules.banned import BannedPatterns
from guardrail.rules.timeout import IdleTimeout
from guardrail.tokenizers import get_encoding
from tests.apps import (
    CHAT_PATH,
    ChatChunks,
    Receiver,
    Recorder,
    SteppedApp,
    http_scope,
    read_body,
    sdk_chat,
    split_events,
)
from tests.servers import metrics_showing, serve_in_thread, wait_for_records

KEY_PATTERN = r"(?<![A-Za-z0-9])sk-[A-Za-z0-9]{20,}"
KEY = "sk-" + "Zq9Xw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe"
PREFIX = "Sure. Your key is "
LEAKY_DELTAS = ["Sure. ", "Your key is s", "k-", KEY[3:12], KEY[12:], " and more."]
BACKUP_ANSWER = "I can't share keys, but here is how to create your own."
TRIPPING_ANSWER = "The backup knows about Project Starlight too."
CLIENT_KEY = "client-secret-token"
TIMEOUT = 10.0
STALL_BEFORE = 0.6

FIRST = ChatChunks(id="chatcmpl-first", created=1730000000, model="primary")
BACKUP = ChatChunks(id="chatcmpl-backup", created=1740000000, model="backup-model", compact=True)


def guard_rules(url: str, *, model: str | None = "backup-model") -> RuleSet:
    rule = BoundRule(
        "secrets",
        BannedPatterns(patterns=[KEY_PATTERN], phrases=["project starlight"]),
        Action.FALLBACK,
        fallback=Fallback("backup", url=url, model=model),
    )
    return RuleSet.from_rules([rule], paths=["/v1/*"])


# --- the engine's continuation mode ---------------------------------------------------------


def run_guard(guard: StreamGuard, parts: list[bytes]) -> tuple[bytes, list[object]]:
    outputs = [output for part in parts for output in guard.feed(part)]
    outputs += guard.close()
    wire = b"".join(output.data for output in outputs if isinstance(output, SendBytes))
    return wire, [output for output in outputs if not isinstance(output, SendBytes)]


def test_a_continuation_joins_the_first_streams_identity_and_drops_its_role() -> None:
    rules = guard_rules("http://127.0.0.1:9/v1/chat/completions").rules
    first = StreamGuard(rules)
    _, others = run_guard(first, [FIRST.role(), *(FIRST.content(delta) for delta in LEAKY_DELTAS)])
    assert isinstance(others[-1], Ended) and others[-1].fallback is not None
    assert first.identity["id"] == "chatcmpl-first"

    continuation = StreamGuard(rules, identity=first.identity, continuation=True)
    wire, others = run_guard(continuation, BACKUP.stream([BACKUP_ANSWER[:10], BACKUP_ANSWER[10:]]))
    events = split_events(wire)
    chunks = [event.json for event in events if event.is_chunk]
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {("chatcmpl-first", 1730000000, "primary")}
    assert not any("role" in choice["delta"] for c in chunks for choice in c["choices"])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == BACKUP_ANSWER
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-1].is_done
    assert others == [Ended(Outcome.COMPLETED)]


def test_a_second_trip_in_a_continuation_aborts() -> None:
    rules = guard_rules("http://127.0.0.1:9/v1/chat/completions").rules
    continuation = StreamGuard(rules, identity={"id": "chatcmpl-first"}, continuation=True)
    wire, others = run_guard(continuation, BACKUP.stream(["The backup knows about Proj", "ect Starlight too."]))
    events = split_events(wire)
    assert "".join(e.json["choices"][0]["delta"].get("content", "") for e in events if e.is_text) == (
        "The backup knows about "
    )
    assert [choice["finish_reason"] for e in events if e.is_chunk for choice in e.json["choices"]][-1] == (
        "content_filter"
    )
    assert events[-1].is_done
    assert isinstance(others[0], Intervention) and others[0].action is Action.FALLBACK
    assert others[-1] == Ended(Outcome.ABORTED, "secrets")


def test_abort_ends_a_stream_that_has_not_started_with_content_filter() -> None:
    guard = StreamGuard([], identity={"id": "chatcmpl-x", "created": 1, "model": "m"}, continuation=True)
    outputs = guard.abort()
    assert outputs[-1] == Ended(Outcome.ABORTED)
    events = split_events(b"".join(o.data for o in outputs if isinstance(o, SendBytes)))
    assert events[0].json["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "content_filter"}]
    assert events[0].json["id"] == "chatcmpl-x"
    assert events[-1].is_done
    assert guard.abort() == []


# --- the fallback request and its credentials ------------------------------------------------


def scope_with(headers: list[tuple[bytes, bytes]], **extra: object) -> Scope:
    scope = http_scope()
    scope["headers"] = headers
    scope.update(extra)
    return scope


BODY = b'{"model":"primary","messages":[{"role":"user","content":"hi"}],"stream":true,"temperature":0.2}'
HEADERS = [
    (b"host", b"proxy.example:8000"),
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
    (b"authorization", b"Bearer " + CLIENT_KEY.encode()),
    (b"x-api-key", b"other-secret"),
    (b"connection", b"keep-alive"),
    (b"x-request-id", b"req-1"),
]


def test_the_fallback_request_is_the_original_body_with_model_and_stream_set() -> None:
    request = ChatRequest(BODY, json.loads(BODY))
    built = fallback_request(request, Fallback("b", url="http://other.example/v1/chat/completions", model="m2"), {})
    assert built is not None
    assert json.loads(built.body) == {**json.loads(BODY), "model": "m2", "stream": True}
    without_model = fallback_request(
        ChatRequest(b'{"model":"a","messages":[]}', {"model": "a", "messages": []}),
        Fallback("b", url="http://other.example/v1/chat/completions"),
        {},
    )
    assert without_model is not None and json.loads(without_model.body) == {
        "model": "a",
        "messages": [],
        "stream": True,
    }
    assert fallback_request(ChatRequest(), Fallback("b", url="http://x/v1"), {}) is None


@pytest.mark.parametrize(
    ("url", "dialect", "called"),
    [
        ("http://h:8000/v1", "openai_chat", "http://h:8000/v1/chat/completions"),
        ("http://h:8000/v1/", "anthropic_messages", "http://h:8000/v1/messages"),
        ("http://h/openai/v1?api-version=1", "openai_responses", "http://h/openai/v1/responses?api-version=1"),
        ("http://h", "openai_chat", "http://h/v1/chat/completions"),  # as --upstream http://h would
        ("http://h/v1/chat/completions", "anthropic_messages", "http://h/v1/chat/completions"),  # as written
    ],
)
def test_a_base_url_is_called_at_the_endpoint_of_the_answers_dialect(url: str, dialect: str, called: str) -> None:
    built = fallback_request(ChatRequest(BODY, json.loads(BODY)), Fallback("b", url=url), {}, dialect)
    assert built is not None and built.url == called


@pytest.mark.parametrize(
    ("url", "declared", "forwarded"),
    [
        ("http://other.example:8000/v1/chat/completions", (), False),  # another host
        ("https://proxy.example:8000/v1/chat/completions", (), False),  # another scheme
        ("http://proxy.example:8001/v1/chat/completions", (), False),  # another port
        ("http://PROXY.example:8000/v2/chat", (), True),  # where the client sent its credentials
        ("https://api.example/v1/chat/completions", ("https://api.example:443/v1",), True),  # serve's upstream
    ],
)
def test_credentials_go_only_where_the_client_sent_them(url: str, declared: tuple[str, ...], forwarded: bool) -> None:
    scope = scope_with(HEADERS, **{CREDENTIAL_ORIGINS_KEY: declared})
    built = fallback_request(ChatRequest(BODY, json.loads(BODY)), Fallback("b", url=url), scope)
    assert built is not None
    names = [name for name, _ in built.headers]
    assert (b"authorization" in names) is forwarded
    assert (b"x-api-key" in names) is forwarded
    assert b"x-request-id" in names
    assert b"connection" not in names and b"host" not in names and b"content-length" not in names


def test_urls_are_logged_without_credentials() -> None:
    assert display_url("https://user:pw@api.example/v1/chat?key=secret#x") == "https://api.example/v1/chat"
    assert origin_of("https://API.example/v1") == "https://api.example:443"
    assert origin_of("ftp://x") is None


# --- end to end: servers in threads ------------------------------------------------------------


@dataclass
class ModelServer:
    """An OpenAI-ish upstream. The request's ``model`` picks the answer:

    ``primary`` leaks a key, then streams " more" until the client leaves (``gone`` is set then);
    ``backup-model`` answers ``BACKUP_ANSWER``; ``backup-trips`` mentions the code name;
    ``backup-broken`` answers 503; ``backup-stalls`` waits ``STALL_BEFORE``, sends one delta and stalls.
    """

    requests: list[tuple[dict[str, str], dict[str, object]]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    gone: threading.Event = field(default_factory=threading.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        payload = json.loads(body)
        self.requests.append(({k.decode(): v.decode() for k, v in scope["headers"]}, payload))
        self.paths.append(scope["path"])
        model = payload.get("model")
        if model == "backup-broken":
            error = json.dumps({"error": {"message": "overloaded", "type": "server_error"}}).encode()
            await send(
                {"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": error})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        if model == "primary":
            await self._leak_until_gone(receive, send)
            return
        if model == "backup-stalls":
            await anyio.sleep(STALL_BEFORE)  # past the first stream's idle deadline
            for event in (BACKUP.role(), BACKUP.content(BACKUP_ANSWER[:12])):
                await send({"type": "http.response.body", "body": event, "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass  # stalled until the guard gives up on it
            return
        text = TRIPPING_ANSWER if model == "backup-trips" else BACKUP_ANSWER
        events = BACKUP.stream([text[:12], text[12:30], text[30:]])
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            events.insert(-1, BACKUP.usage(prompt=99, completion=7))  # its own answer's count, as an upstream would
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _leak_until_gone(self, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            for event in [FIRST.role(), *(FIRST.content(delta) for delta in LEAKY_DELTAS)]:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            while True:
                await anyio.sleep(0.01)
                await send({"type": "http.response.body", "body": FIRST.content(" more"), "more_body": True})

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(stream)
            while (await receive())["type"] != "http.disconnect":
                pass
            self.gone.set()
            tasks.cancel_scope.cancel()


@dataclass
class GeneratorLog:
    closed: threading.Event = field(default_factory=threading.Event)


def leaky_app(rules: RuleSet, log: GeneratorLog, on_record: Callable[[StreamRecord], None] | None = None) -> FastAPI:
    """A FastAPI app streaming the leaky answer forever, guarded by ``rules`` (middleware mode)."""

    async def answer() -> AsyncIterator[bytes]:
        try:
            for event in [FIRST.role(), *(FIRST.content(delta) for delta in LEAKY_DELTAS)]:
                await anyio.sleep(0)
                yield event
            while True:
                await anyio.sleep(0.01)
                yield FIRST.content(" more")
        finally:
            log.closed.set()

    app = FastAPI()

    @app.post(CHAT_PATH)
    async def completions() -> StreamingResponse:
        return StreamingResponse(answer(), media_type="text/event-stream")

    metrics = GuardMetrics(CollectorRegistry())
    app.add_middleware(GuardrailMiddleware, rules=rules, metrics=metrics, on_record=on_record)
    return app


@pytest.fixture
def backup() -> Iterator[tuple[ModelServer, str]]:
    server = ModelServer()
    with serve_in_thread(server, lifespan="off") as url:
        yield server, url


def sdk_stream(base_url: str) -> tuple[str, list[str], set[str]]:
    return sdk_chat(base_url, "my key?", model="primary", api_key=CLIENT_KEY, timeout=TIMEOUT)


def raw_stream(base_url: str) -> bytes:
    body = {"model": "primary", "messages": [{"role": "user", "content": "my key?"}], "stream": True}
    with httpx.Client(timeout=TIMEOUT) as client:
        response = client.post(f"{base_url}{CHAT_PATH}", json=body, headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert response.status_code == 200
    return response.content


def test_middleware_mode_streams_the_prefix_then_the_fallback_answer(backup: tuple[ModelServer, str]) -> None:
    server, backup_url = backup
    log = GeneratorLog()
    app = leaky_app(guard_rules(f"{backup_url}{CHAT_PATH}"), log)
    with serve_in_thread(app) as base_url:
        text, reasons, ids = sdk_stream(base_url)
        assert log.closed.wait(TIMEOUT), "the first answer's generator was not closed"
        wire = raw_stream(base_url)
    assert text == PREFIX + BACKUP_ANSWER
    assert reasons == ["stop"]
    assert ids == {"chatcmpl-first"}
    events = split_events(wire)
    assert events[-1].is_done and sum(event.is_done for event in events) == 1
    headers, payload = server.requests[0]
    assert payload["model"] == "backup-model" and payload["stream"] is True
    assert payload["messages"] == [{"role": "user", "content": "my key?"}]
    assert "authorization" not in headers  # the fallback is on another origin (another port)


def test_a_second_trip_inside_the_fallback_answer_aborts(backup: tuple[ModelServer, str]) -> None:
    _, backup_url = backup
    app = leaky_app(guard_rules(f"{backup_url}{CHAT_PATH}", model="backup-trips"), GeneratorLog())
    with serve_in_thread(app) as base_url:
        text, reasons, ids = sdk_stream(base_url)
        wire = raw_stream(base_url)
    assert text == PREFIX + "The backup knows about "
    assert reasons == ["content_filter"]
    assert ids == {"chatcmpl-first"}
    assert split_events(wire)[-1].is_done


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("broken", ["unreachable", "503"])
def test_a_fallback_that_does_not_answer_ends_the_stream_as_an_abort(
    backup: tuple[ModelServer, str], broken: str
) -> None:
    _, backup_url = backup
    if broken == "unreachable":
        rules = guard_rules(f"http://127.0.0.1:{free_port()}{CHAT_PATH}")
    else:
        rules = guard_rules(f"{backup_url}{CHAT_PATH}", model="backup-broken")
    with serve_in_thread(leaky_app(rules, GeneratorLog())) as base_url:
        text, reasons, _ = sdk_stream(base_url)
        wire = raw_stream(base_url)
    assert (text, reasons) == (PREFIX, ["content_filter"])
    assert split_events(wire)[-1].is_done


@pytest.mark.anyio
async def test_a_request_body_that_was_not_kept_degrades_to_an_abort(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("guardrail.asgi.request.MAX_REQUEST_BYTES", 10)
    app = SteppedApp([FIRST.role(), *(FIRST.content(delta) for delta in LEAKY_DELTAS)])
    rules = guard_rules("http://127.0.0.1:9/v1/chat/completions")
    middleware = GuardrailMiddleware(app, rules=rules, metrics=GuardMetrics(CollectorRegistry()))
    recorder = Recorder()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(middleware, http_scope(), Receiver(), recorder)
            for _ in range(1 + len(LEAKY_DELTAS)):  # the key is decisive once the text after it arrives
                await app.step()
            await recorder.completed.wait()
    assert recorder.content == PREFIX
    assert recorder.events[-2].json["choices"][0]["finish_reason"] == "content_filter"
    assert recorder.events[-1].is_done
    recorder.assert_ended_cleanly()
    assert app.log.cancelled


@pytest.mark.parametrize("url_form", [CHAT_PATH, "/v1", "/v1/"], ids=["endpoint", "base", "base-slash"])
def test_serve_branches_to_a_fallback_on_its_upstreams_origin_and_closes_the_first(
    tmp_path: Path, url_form: str
) -> None:
    """A fallback url in the endpoint form, or in the base form ``--upstream`` takes, reaches the chat endpoint."""
    upstream = ModelServer()
    with serve_in_thread(upstream, lifespan="off") as upstream_url:
        rule_file = tmp_path / "rules.yaml"
        rule_file.write_text(
            f"""\
version: 1
paths: ["/v1/chat/completions"]
rules:
  - name: secrets
    type: banned_patterns
    patterns: ['{KEY_PATTERN}']
    action: fallback
    fallback: backup
fallbacks:
  backup:
    url: {upstream_url}{url_form}
    model: backup-model
""",
            encoding="utf-8",
        )
        settings = ServeSettings((str(rule_file),), f"{upstream_url}/v1")
        with serve_in_thread(build_app(settings, registry=CollectorRegistry())) as base_url:
            text, reasons, ids = sdk_stream(base_url)
            # The client is still connected: only the proxy can have closed the first upstream's stream.
            assert upstream.gone.wait(TIMEOUT), "the first upstream's connection was not closed"
            counted = 'guardrail_streams_total{dialect="openai_chat",outcome="fallback"} 1.0'
            metrics_showing(base_url, re.escape(counted))
    assert text == PREFIX + BACKUP_ANSWER
    assert reasons == ["stop"]
    assert ids == {"chatcmpl-first"}
    (first_headers, first), (backup_headers, second) = upstream.requests
    assert (first["model"], second["model"]) == ("primary", "backup-model")
    assert upstream.paths == [CHAT_PATH, CHAT_PATH]
    # The fallback is on the upstream's origin, which gets the client's key anyway.
    assert first_headers["authorization"] == backup_headers["authorization"] == f"Bearer {CLIENT_KEY}"


def test_a_timeout_before_the_first_token_branches_too(backup: tuple[ModelServer, str]) -> None:
    _, backup_url = backup
    stopped = threading.Event()

    async def silent(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            stopped.set()

    rule = BoundRule(
        "stalled",
        IdleTimeout(seconds=0.2),
        Action.FALLBACK,
        fallback=Fallback("backup", url=f"{backup_url}{CHAT_PATH}", model="backup-model"),
    )
    app = GuardrailMiddleware(silent, rules=RuleSet.from_rules([rule]), metrics=GuardMetrics(CollectorRegistry()))
    with serve_in_thread(app, lifespan="off") as base_url:
        text, reasons, ids = sdk_stream(base_url)
        assert stopped.wait(TIMEOUT), "the silent app was not stopped"
    assert (text, reasons) == (BACKUP_ANSWER, ["stop"])
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-guardrail-")


def test_a_stalled_fallback_times_out_on_its_own_idle_limit(backup: tuple[ModelServer, str]) -> None:
    # The first stream's deadline watcher wakes after the branch began (its idle limit passes):
    # that must not stop the fallback's first text from bringing the fallback's deadline forward.
    _, backup_url = backup
    rules = [
        *guard_rules(f"{backup_url}{CHAT_PATH}", model="backup-stalls").rules,
        BoundRule("stalled", IdleTimeout(seconds=0.3, first_token_seconds=3.0), Action.ABORT),
    ]
    app = leaky_app(RuleSet.from_rules(rules, paths=["/v1/*"]), GeneratorLog())
    with serve_in_thread(app) as base_url:
        started = time.monotonic()
        wire = raw_stream(base_url)
        elapsed = time.monotonic() - started
    assert b'"code":"idle_timeout"' in wire
    # Idle limit: 0.3 s after the fallback's first text (at 0.6 s); the first-token limit is 3 s.
    assert elapsed < 2.0


def test_a_url_fallback_reads_as_one_answer_with_usage_counting_all_the_client_received(
    backup: tuple[ModelServer, str],
) -> None:
    server, backup_url = backup
    records: list[StreamRecord] = []
    app = leaky_app(guard_rules(f"{backup_url}{CHAT_PATH}"), GeneratorLog(), records.append)
    body = {
        "model": "primary",
        "messages": [{"role": "user", "content": "my key?"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with serve_in_thread(app) as base_url:
        wire = httpx.post(f"{base_url}{CHAT_PATH}", json=body, timeout=TIMEOUT).content
        wait_for_records(records)
    chunks = [event.json for event in split_events(wire) if event.is_chunk]
    assert {(chunk["id"], chunk["model"]) for chunk in chunks} == {("chatcmpl-first", "primary")}
    usages = [chunk["usage"] for chunk in chunks if chunk.get("usage")]
    text = "".join(c["delta"].get("content") or "" for chunk in chunks for c in chunk["choices"])
    assert text == PREFIX + BACKUP_ANSWER
    encoding = get_encoding("o200k_base")
    assert len(usages) == 1 and usages[0]["completion_tokens"] == len(encoding.encode(text))
    assert usages[0]["prompt_tokens"] != 99  # the prompt counted once, by the guard
    (record,) = records
    assert record.completion_tokens == usages[0]["completion_tokens"]
    assert record.fallback is not None and record.fallback["name"] == "backup"
    assert record.fallback["model"] == "backup-model"
    # The fallback's share: the whole answer's tokens less the prefix's.
    assert record.fallback["completion_tokens"] == len(encoding.encode(text)) - len(encoding.encode(PREFIX))
