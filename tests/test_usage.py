"""Usage chunks, prompt budgets and the per-stream record (issue 3, acceptance 4 and 5, and the record).

The openai SDK over a real uvicorn socket where what it does matters (usage chunks as it parses
them, ``BadRequestError`` and its retries); a raw ASGI harness for the rest (tests/apps.py).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam
from prometheus_client import CollectorRegistry
from starlette.middleware import Middleware

from guardrail._types import ASGIApp, Message, Receive, Scope, Send
from guardrail.asgi import GuardrailMiddleware
from guardrail.asgi.record import RuleHit, StreamRecord
from guardrail.config import RuleSet
from guardrail.core.engine import StreamGuard
from guardrail.core.outputs import Send as SendBytes
from guardrail.core.rule import Action, BoundRule, Fallback
from guardrail.metrics import GuardMetrics
from guardrail.rules.banned import BannedPatterns
from guardrail.rules.budget import TokenBudget, count_prompt_tokens
from guardrail.rules.timeout import IdleTimeout
from guardrail.tokenizers import get_encoding
from tests.apps import (
    DONE,
    ChatChunks,
    ClientEvent,
    Receiver,
    Recorder,
    finish_reasons,
    generator_app,
    http_scope,
    joined_content,
    replay_app,
    split_events,
)
from tests.servers import serve_in_thread

ANSWER = [
    "Streaming",
    " hides",
    " latency",
    ":",
    " words",
    " appear",
    " as",
    " they",
    " are",
    " generated",
    ".",
    " 한국어",
    " 문장도",
    " 🎉",
    " And",
    " a",
    " key",
    " sk-",
    "A1b2C3d4E5f6G7h8I9j0",
    "K1l2",
    " never",
    " leaks",
    ".",
]
ANSWER_TEXT = "".join(ANSWER)
BEFORE_KEY = ANSWER_TEXT[: ANSWER_TEXT.index("sk-")]
KEY_PATTERN = r"(?<![A-Za-z0-9])sk-[A-Za-z0-9]{20,}"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Why stream answers?", "name": "ada"},
]
CHAT = ChatChunks()


def o200k_count(text: str) -> int:
    return len(get_encoding("o200k_base").encode_ordinary(text))


def prompt_tokens_of(messages: Sequence[ChatCompletionMessageParam]) -> int:
    return count_prompt_tokens({"messages": list(messages)}, get_encoding("o200k_base"))


def budget_rule(
    max_tokens: int | None = 5, *, max_prompt_tokens: int | None = None, action: Action = Action.ABORT
) -> BoundRule:
    budget = TokenBudget(get_encoding("o200k_base"), max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens)
    fallback = Fallback(name="sorry", text="Sorry, that was too long.") if action is Action.FALLBACK else None
    return BoundRule("budget", budget, action, fallback=fallback)


def secrets_rule() -> BoundRule:
    return BoundRule("secrets", BannedPatterns(patterns=[KEY_PATTERN]), Action.ABORT)


def rule_set(*rules: BoundRule) -> RuleSet:
    return RuleSet.from_rules(rules, paths=["/v1/*"])


def request_body(
    *, include_usage: bool | None = True, messages: Sequence[ChatCompletionMessageParam] = MESSAGES
) -> bytes:
    payload: dict[str, Any] = {"model": "gpt-test", "messages": list(messages), "stream": True}
    if include_usage is not None:
        payload["stream_options"] = {"include_usage": include_usage}
    return json.dumps(payload).encode()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# -- the openai SDK over a real socket ------------------------------------------------------------


@dataclass
class ServedApp:
    """What the app behind the middleware did, seen from the test thread."""

    requests: int = 0  # requests the server passed to the middleware
    ran: threading.Event = field(default_factory=threading.Event)  # the app's answer started


def sdk_app(rules: RuleSet | str, served: ServedApp, bodies: Sequence[bytes], registry: CollectorRegistry) -> ASGIApp:
    """A Starlette app streaming ``bodies``, guarded by ``rules``, counting the requests that reach the server."""

    async def generate() -> AsyncIterator[bytes]:
        served.ran.set()
        for body in bodies:
            await anyio.sleep(0)
            yield body

    guard = Middleware(GuardrailMiddleware, rules=rules, metrics=GuardMetrics(registry))
    app = generator_app(generate, middleware=[guard])

    async def counting(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            served.requests += 1
        await app(scope, receive, send)

    return counting


def stream_with_sdk(
    base_url: str, *, include_usage: bool = True, messages: Sequence[ChatCompletionMessageParam] = MESSAGES
) -> list[ChatCompletionChunk]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="test", max_retries=0, timeout=10) as client:
        options: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
        with client.chat.completions.create(
            model="gpt-test", messages=list(messages), stream=True, **options
        ) as stream:
            return list(stream)


def sdk_text(chunks: Sequence[ChatCompletionChunk]) -> str:
    return "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)


def sdk_finish_reasons(chunks: Sequence[ChatCompletionChunk]) -> list[str]:
    return [str(choice.finish_reason) for chunk in chunks for choice in chunk.choices if choice.finish_reason]


@pytest.mark.parametrize(("rule_type", "finish_reason"), [("token_budget", "length"), ("banned", "content_filter")])
def test_a_stream_cut_by_the_guard_ends_with_a_usage_chunk_counting_the_text_received(
    rule_type: str, finish_reason: str
) -> None:
    rule = budget_rule(5) if rule_type == "token_budget" else secrets_rule()
    served = ServedApp()
    app = sdk_app(rule_set(rule), served, CHAT.stream(ANSWER), CollectorRegistry())
    with serve_in_thread(app) as base_url:
        chunks = stream_with_sdk(base_url)
    received = sdk_text(chunks)
    assert ANSWER_TEXT.startswith(received) and received != ANSWER_TEXT
    assert sdk_finish_reasons(chunks) == [finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == o200k_count(received)
    assert last.usage.prompt_tokens == prompt_tokens_of(MESSAGES)
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert [chunk.usage for chunk in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert {(chunk.id, chunk.model, chunk.created) for chunk in chunks} == {("chatcmpl-test", "gpt-test", CHAT.created)}


def test_a_cut_stream_without_include_usage_gets_no_usage_chunk() -> None:
    served = ServedApp()
    app = sdk_app(rule_set(budget_rule(5)), served, CHAT.stream(ANSWER), CollectorRegistry())
    with serve_in_thread(app) as base_url:
        chunks = stream_with_sdk(base_url, include_usage=False)
    assert sdk_finish_reasons(chunks) == ["length"]
    assert o200k_count(sdk_text(chunks)) == 5
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)


# -- usage through the raw ASGI harness -----------------------------------------------------------


@dataclass
class Served:
    recorder: Recorder
    records: list[StreamRecord]
    registry: CollectorRegistry

    @property
    def data_events(self) -> list[ClientEvent]:
        return [event for event in self.recorder.events if event.data is not None]

    @property
    def usage_events(self) -> list[ClientEvent]:
        return [event for event in self.data_events if event.is_chunk and event.json.get("usage")]


async def serve(
    bodies: Sequence[bytes],
    *rules: BoundRule,
    body: bytes | None = None,
    record_text: bool = False,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> Served:
    """One request through the middleware over an app that sends ``bodies``, to the end."""
    messages: list[Message] = [
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    ]
    messages += [{"type": "http.response.body", "body": data, "more_body": True} for data in bodies]
    messages.append({"type": "http.response.body", "body": b"", "more_body": False})
    registry = CollectorRegistry()
    records: list[StreamRecord] = []
    middleware = GuardrailMiddleware(
        replay_app(messages),
        rules=rule_set(*rules),
        metrics=GuardMetrics(registry),
        on_record=records.append,
        record_text=record_text,
    )
    scope = http_scope()
    scope["headers"] = [*scope["headers"], *headers]
    recorder = Recorder()
    with anyio.fail_after(5):
        await middleware(scope, Receiver(request_body() if body is None else body), recorder)
    recorder.assert_ended_cleanly()
    return Served(recorder, records, registry)


@pytest.mark.anyio
async def test_an_uncut_stream_without_a_usage_chunk_gets_one_before_done() -> None:
    served = await serve(CHAT.stream(ANSWER[:11]), budget_rule(100))
    events = served.data_events
    assert joined_content(events) == "".join(ANSWER[:11])
    assert events[-1].is_done
    usage = events[-2].json
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": prompt_tokens_of(MESSAGES),
        "completion_tokens": o200k_count("".join(ANSWER[:11])),
        "total_tokens": prompt_tokens_of(MESSAGES) + o200k_count("".join(ANSWER[:11])),
    }
    assert {key: usage[key] for key in ("id", "object", "created", "model")} == {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": CHAT.created,
        "model": "gpt-test",
    }
    assert finish_reasons(events) == [(0, "stop")]
    assert len(served.usage_events) == 1


@pytest.mark.anyio
async def test_a_stream_that_never_sends_done_gets_its_usage_chunk_at_the_end() -> None:
    bodies = [CHAT.role(), *(CHAT.content(delta) for delta in ANSWER[:4]), CHAT.finish("stop")]
    served = await serve(bodies, budget_rule(100))
    last = served.data_events[-1]
    assert last.json["choices"] == []
    assert last.json["usage"]["completion_tokens"] == o200k_count("".join(ANSWER[:4]))
    assert not any(event.is_done for event in served.data_events)


@pytest.mark.anyio
async def test_an_apps_own_usage_chunk_passes_through_unchanged_and_alone() -> None:
    own_usage = CHAT.usage(prompt=1234, completion=5678)
    bodies = [CHAT.role(), *(CHAT.content(delta) for delta in ANSWER[:11]), CHAT.finish("stop"), own_usage, DONE]
    served = await serve(bodies, budget_rule(100))
    assert [event.raw for event in served.usage_events] == [own_usage]
    assert served.recorder.body == b"".join(bodies)


@pytest.mark.anyio
@pytest.mark.parametrize("include_usage", [None, False])
async def test_no_usage_chunk_is_added_unless_the_request_asked_for_one(include_usage: bool | None) -> None:
    bodies = CHAT.stream(ANSWER[:11])
    served = await serve(bodies, budget_rule(100), body=request_body(include_usage=include_usage))
    assert served.recorder.body == b"".join(bodies)
    cut = await serve(CHAT.stream(ANSWER), budget_rule(5), body=request_body(include_usage=include_usage))
    assert finish_reasons(cut.data_events) == [(0, "length")]
    assert cut.usage_events == []


@pytest.mark.anyio
async def test_a_fallback_answer_is_counted_in_the_usage_chunk() -> None:
    # The client receives the safe prefix and then the fallback text: usage counts all of it.
    served = await serve(CHAT.stream(ANSWER), budget_rule(5, action=Action.FALLBACK))
    received = joined_content(served.data_events)
    assert received == "Streaming hides latency: words\n\nSorry, that was too long."
    assert served.usage_events[0].json["usage"]["completion_tokens"] == o200k_count(received)
    assert served.records[0].completion_tokens == o200k_count(received)


@pytest.mark.anyio
@pytest.mark.parametrize("with_done", [True, False], ids=["done", "no_done"])
@pytest.mark.parametrize("rule_type", ["token_budget", "banned"])
async def test_a_fallback_that_fires_as_the_stream_ends_is_counted_with_the_text_before_it(
    rule_type: str, with_done: bool
) -> None:
    # Both rules can only decide at the end: the budget once the last word is settled, the
    # pattern once nothing more can extend the key.
    if rule_type == "token_budget":
        rule, deltas = budget_rule(3, action=Action.FALLBACK), ["The quick brown fox"]
        expected = "The quick brown\n\nSorry, that was too long."
    else:
        banned = BannedPatterns(patterns=[r"sk-[a-z]{5,}"])
        rule = BoundRule("secrets", banned, Action.FALLBACK, fallback=Fallback(name="sorry", text="Sorry."))
        deltas = ["The key is", " sk-abc", "defgh"]
        expected = "The key is \n\nSorry."
    bodies = [CHAT.role(), *(CHAT.content(delta) for delta in deltas), CHAT.finish("stop")]
    served = await serve([*bodies, DONE] if with_done else bodies, rule, record_text=True)
    received = joined_content(served.data_events)
    assert received == expected
    assert served.usage_events[0].json["usage"]["completion_tokens"] == o200k_count(received)
    [record] = served.records
    assert record.text == {"choices[0].content": received}
    assert record.completion_tokens == o200k_count(received)


def test_a_timeout_fallback_is_counted_with_the_text_before_it() -> None:
    stalled = BoundRule(
        "stalled", IdleTimeout(seconds=5), Action.FALLBACK, fallback=Fallback(name="again", text="Please try again.")
    )
    encoding = get_encoding("o200k_base")
    guard = StreamGuard([stalled], encoding=encoding, include_usage=True, prompt_tokens=5)
    wire = b""
    for now, data in enumerate([CHAT.role(), CHAT.content("The quick brown"), CHAT.content(" fox")]):
        wire += b"".join(output.data for output in guard.feed(data, float(now)) if isinstance(output, SendBytes))
    wire += b"".join(output.data for output in guard.expire(60.0) if isinstance(output, SendBytes))
    events = split_events(wire)
    received = joined_content(events)
    assert received == "The quick brown fox\n\nPlease try again."
    usage = [event.json["usage"] for event in events if event.is_chunk and event.json.get("usage")]
    assert usage == [
        {"prompt_tokens": 5, "completion_tokens": o200k_count(received), "total_tokens": 5 + o200k_count(received)}
    ]
    assert guard.sent_text() == {"choices[0].content": received}


def test_an_error_ending_carries_the_usage_asked_for_before_its_error_event() -> None:
    stalled = BoundRule("stalled", IdleTimeout(seconds=5), Action.ABORT)
    guard = StreamGuard([stalled], encoding=get_encoding("o200k_base"), include_usage=True, prompt_tokens=5)
    wire = b""
    for now, data in enumerate([CHAT.role(), CHAT.content("The quick brown")]):
        wire += b"".join(output.data for output in guard.feed(data, float(now)) if isinstance(output, SendBytes))
    wire += b"".join(output.data for output in guard.expire(60.0) if isinstance(output, SendBytes))
    events = [event.json for event in split_events(wire) if event.json is not None]
    usage, error = events[-2], events[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == o200k_count("The quick brown")
    assert error["error"]["code"] == "idle_timeout"


# -- prompt counting and prompt budgets (acceptance 5) --------------------------------------------


def cookbook_prompt_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """OpenAI cookbook's "How to count tokens with tiktoken", for string contents."""
    encoding = get_encoding("o200k_base")
    total = 3
    for message in messages:
        total += 3
        for key, value in message.items():
            total += len(encoding.encode_ordinary(value))
            if key == "name":
                total += 1
    return total


def test_prompt_tokens_follow_the_cookbook_and_count_only_text_parts() -> None:
    plain = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hi 🎉", "name": "ada"}]
    assert count_prompt_tokens({"messages": plain}, get_encoding("o200k_base")) == cookbook_prompt_tokens(plain)
    parts: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "this picture."},
            ],
        }
    ]
    expected = 3 + 3 + o200k_count("user") + o200k_count("Describe ") + o200k_count("this picture.")
    assert count_prompt_tokens({"messages": parts}, get_encoding("o200k_base")) == expected
    assert count_prompt_tokens({"model": "m"}, get_encoding("o200k_base")) == 0


PROMPT_RULE_FILE = """\
version: 1
paths: ["/v1/*"]
rules:
  - name: prompt-budget
    type: token_budget
    max_prompt_tokens: 50
    action: {action}
fallbacks:
  sorry:
    text: "Sorry."
"""
LONG_MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Please summarise the following text in one sentence. " + "The quick brown fox. " * 20}
]


@pytest.mark.parametrize("action", ["abort", "fallback\n    fallback: sorry"], ids=["abort", "fallback"])
def test_an_over_budget_prompt_is_refused_with_a_400_the_sdk_raises_and_does_not_retry(
    tmp_path: Path, action: str
) -> None:
    assert prompt_tokens_of(LONG_MESSAGES) > 50
    rule_file = tmp_path / "prompt.yaml"
    rule_file.write_text(PROMPT_RULE_FILE.format(action=action), encoding="utf-8")
    served = ServedApp()
    app = sdk_app(str(rule_file), served, CHAT.stream(ANSWER), CollectorRegistry())
    with serve_in_thread(app) as base_url:
        with openai.OpenAI(base_url=f"{base_url}/v1", api_key="test", timeout=10) as client:
            assert client.max_retries == 2
            with pytest.raises(openai.BadRequestError) as raised:
                client.chat.completions.create(model="gpt-test", messages=LONG_MESSAGES, stream=True)
    error = raised.value
    assert (error.status_code, error.code, error.type, error.param) == (
        400,
        "prompt_too_long",
        "invalid_request_error",
        "messages",
    )
    assert f"{prompt_tokens_of(LONG_MESSAGES)} tokens" in error.message
    assert error.response.headers["x-should-retry"] == "false"
    assert served.requests == 1
    assert not served.ran.is_set(), "the app ran for a refused prompt"


def test_a_prompt_of_exactly_the_budget_goes_through(tmp_path: Path) -> None:
    rule_file = tmp_path / "prompt.yaml"
    budget = prompt_tokens_of(MESSAGES)
    rule_file.write_text(PROMPT_RULE_FILE.format(action="abort").replace("50", str(budget)), encoding="utf-8")
    served = ServedApp()
    app = sdk_app(str(rule_file), served, CHAT.stream(ANSWER[:4]), CollectorRegistry())
    with serve_in_thread(app) as base_url:
        chunks = stream_with_sdk(base_url)
    assert sdk_text(chunks) == "".join(ANSWER[:4])
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == budget


def test_a_logged_prompt_budget_lets_the_request_through_and_counts_the_hit(tmp_path: Path) -> None:
    rule_file = tmp_path / "prompt.yaml"
    rule_file.write_text(PROMPT_RULE_FILE.format(action="log"), encoding="utf-8")
    served = ServedApp()
    registry = CollectorRegistry()
    app = sdk_app(str(rule_file), served, CHAT.stream(ANSWER[:4]), registry)
    with serve_in_thread(app) as base_url:
        chunks = stream_with_sdk(base_url, messages=LONG_MESSAGES)
    assert sdk_text(chunks) == "".join(ANSWER[:4])
    assert sdk_finish_reasons(chunks) == ["stop"]
    assert served.ran.is_set()
    assert sample(registry, "guardrail_interventions_total", rule="prompt-budget", action="log") == 1
    assert sample(registry, "guardrail_tokens_total", kind="prompt") == prompt_tokens_of(LONG_MESSAGES)


# -- the record of every stream -------------------------------------------------------------------


@pytest.mark.anyio
async def test_each_stream_yields_one_record_with_its_tokens_outcome_and_hits() -> None:
    served = await serve(CHAT.stream(ANSWER), budget_rule(5), headers=[(b"x-request-id", b"req-42")])
    received = joined_content(served.data_events)
    assert o200k_count(received) == 5
    [record] = served.records
    assert (record.request_id, record.path, record.dialect, record.model) == (
        "req-42",
        "/v1/chat/completions",
        "openai_chat",
        "gpt-test",
    )
    assert (record.prompt_tokens, record.completion_tokens) == (prompt_tokens_of(MESSAGES), 5)
    assert record.outcome == "aborted"
    [hit] = record.hits
    assert hit == RuleHit("budget", "abort", "choices[0].content", len(received), hit.end, "over 5 tokens")
    assert len(received) < hit.end <= len(ANSWER_TEXT)
    assert record.deltas >= 5
    assert record.time_to_first_token is not None and 0 <= record.time_to_first_token <= record.duration
    assert record.text is None
    assert sample(served.registry, "guardrail_tokens_total", kind="prompt") == prompt_tokens_of(MESSAGES)
    assert sample(served.registry, "guardrail_tokens_total", kind="completion") == 5


@pytest.mark.anyio
async def test_a_completed_stream_records_every_delta_and_its_tokens() -> None:
    served = await serve(CHAT.stream(ANSWER), budget_rule(100))
    [record] = served.records
    assert (record.outcome, record.hits) == ("completed", [])
    assert record.completion_tokens == o200k_count(ANSWER_TEXT)
    assert record.deltas == len(ANSWER)


@pytest.mark.anyio
async def test_record_text_puts_the_text_received_into_the_record() -> None:
    served = await serve(CHAT.stream(ANSWER), secrets_rule(), record_text=True)
    [record] = served.records
    assert record.text == {"choices[0].content": BEFORE_KEY}
    assert record.completion_tokens == o200k_count(BEFORE_KEY)
    assert record.hits[0].rule == "secrets" and record.hits[0].start == len(BEFORE_KEY)


@pytest.mark.anyio
async def test_the_record_is_logged_as_one_json_line_at_info_without_text(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="guardrail.record"):
        served = await serve(CHAT.stream(ANSWER), budget_rule(5))
    lines = [entry for entry in caplog.records if entry.name == "guardrail.record"]
    assert [entry.levelno for entry in lines] == [logging.INFO]
    message = lines[0].getMessage()
    assert "\n" not in message
    logged = json.loads(message)
    assert logged == served.records[0].as_dict()
    assert logged["text"] is None and logged["completion_tokens"] == 5
    assert "Streaming" not in message


@pytest.mark.anyio
async def test_a_record_with_text_is_never_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="guardrail.record"):
        served = await serve(CHAT.stream(ANSWER), budget_rule(5), record_text=True)
    lines = [entry for entry in caplog.records if entry.name == "guardrail.record"]
    assert [entry.levelno for entry in lines] == [logging.DEBUG]
    assert json.loads(lines[0].getMessage())["text"] == served.records[0].text


@pytest.mark.anyio
async def test_a_logged_prompt_budget_hit_is_in_the_streams_record() -> None:
    body = request_body(messages=LONG_MESSAGES)
    served = await serve(CHAT.stream(ANSWER[:4]), budget_rule(None, max_prompt_tokens=50, action=Action.LOG), body=body)
    [record] = served.records
    assert record.prompt_tokens == prompt_tokens_of(LONG_MESSAGES)
    assert [(hit.rule, hit.action, hit.channel) for hit in record.hits] == [("budget", "log", "prompt")]
