"""End to end: the official openai SDK streams from a real uvicorn server through GuardrailMiddleware.

One FastAPI app per action, served on a real socket; the SDK must iterate every stream to the end
without raising, and see the expected text and finish reasons (issue 2, acceptance 3).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import openai
import pytest
from fastapi import FastAPI
from openai.types.chat import ChatCompletionChunk
from starlette.responses import StreamingResponse

from guardrail._types import Receive, Scope, Send
from guardrail.asgi import GuardrailMiddleware
from guardrail.config import RuleSet
from guardrail.core.rule import Action, BoundRule, Fallback
from guardrail.rules.banned import BannedPatterns
from tests.apps import CHAT_PATH, ChatChunks
from tests.servers import serve_in_thread

KEY_PATTERN = r"(?<![A-Za-z0-9])sk-[A-Za-z0-9]{20,}"
KEY = "sk-" + "Zq9Xw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe"
# The key and the phrase are split across deltas, as a model would chunk them.
DELTAS = [
    "Sure. ",
    "Your key is s",
    "k-",
    KEY[3:12],
    KEY[12:],
    " and the code",
    "name is Proj",
    "ect Starlight",
    ". Anything else?",
]
ANSWER = "".join(DELTAS)
BEFORE_KEY = "Sure. Your key is "
FALLBACK_TEXT = "Sorry, I can't share that."
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "What is my key?"}]


@dataclass
class GeneratorLog:
    """What the app's generator did (it runs in the server's thread)."""

    closed: threading.Event = field(default_factory=threading.Event)  # its finally ran
    exhausted: bool = False  # it yielded everything


def chat_app(rules: str | Path | RuleSet, log: GeneratorLog) -> FastAPI:
    """A FastAPI app streaming ``DELTAS`` as OpenAI chunks, guarded by ``rules``."""
    chunks = ChatChunks()

    async def answer() -> AsyncIterator[bytes]:
        try:
            for event in chunks.stream(DELTAS):
                await anyio.sleep(0)  # a real upstream awaits the network here
                yield event
            log.exhausted = True
        finally:
            log.closed.set()

    app = FastAPI()

    @app.post(CHAT_PATH)
    async def completions() -> StreamingResponse:
        return StreamingResponse(answer(), media_type="text/event-stream")

    app.add_middleware(GuardrailMiddleware, rules=rules)
    return app


def secrets_rules(action: Action) -> RuleSet:
    rule = BoundRule(
        name="secrets",
        rule=BannedPatterns(patterns=[KEY_PATTERN], phrases=["project starlight"]),
        action=action,
        fallback=Fallback(name="sorry", text=FALLBACK_TEXT) if action is Action.FALLBACK else None,
    )
    return RuleSet.from_rules([rule], paths=["/v1/*"])


EXPECTED: dict[Action, tuple[str, list[str]]] = {
    Action.ABORT: (BEFORE_KEY, ["content_filter"]),
    Action.FALLBACK: (BEFORE_KEY + "\n\n" + FALLBACK_TEXT, ["stop"]),
    Action.REDACT: ("Sure. Your key is [redacted] and the codename is [redacted]. Anything else?", ["stop"]),
    Action.LOG: (ANSWER, ["stop"]),
}


def content_and_finish_reasons(chunks: Sequence[ChatCompletionChunk]) -> tuple[str, list[str]]:
    text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    reasons = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason is not None]
    return text, [str(reason) for reason in reasons]


def stream_with_sdk(base_url: str) -> list[ChatCompletionChunk]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="test", max_retries=0, timeout=10) as client:
        with client.chat.completions.create(model="m", messages=MESSAGES, stream=True) as stream:
            return list(stream)


def assert_app_stopped_early(log: GeneratorLog, action: Action) -> None:
    assert log.closed.wait(5), "the app's generator was never closed"
    if action in (Action.ABORT, Action.FALLBACK):
        assert not log.exhausted, "the app went on generating after the stream was ended"
    else:
        assert log.exhausted


@pytest.mark.parametrize("action", list(Action))
def test_the_openai_sdk_iterates_a_guarded_stream_to_the_end(action: Action) -> None:
    log = GeneratorLog()
    with serve_in_thread(chat_app(secrets_rules(action), log)) as base_url:
        chunks = stream_with_sdk(base_url)
    assert content_and_finish_reasons(chunks) == EXPECTED[action]
    assert {chunk.id for chunk in chunks} == {"chatcmpl-test"}
    assert {chunk.model for chunk in chunks} == {"gpt-test"}
    assert_app_stopped_early(log, action)


@pytest.mark.parametrize("action", [Action.ABORT, Action.FALLBACK])
def test_abort_and_fallback_stop_an_endless_raw_asgi_app_behind_a_real_server(action: Action) -> None:
    # uvicorn answers receive() with http.disconnect once a response is complete, which makes a
    # StreamingResponse stop by itself; a raw app that never calls receive() shows that the guard does it.
    log = GeneratorLog()
    chunks = ChatChunks()

    async def endless(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
            )
            for event in [chunks.role(), *(chunks.content(delta) for delta in DELTAS)]:
                await send({"type": "http.response.body", "body": event, "more_body": True})
                await anyio.sleep(0)
            while True:
                await send({"type": "http.response.body", "body": chunks.content("more "), "more_body": True})
                await anyio.sleep(0)
        finally:
            log.closed.set()

    with serve_in_thread(GuardrailMiddleware(endless, rules=secrets_rules(action)), lifespan="off") as base_url:
        with openai.OpenAI(base_url=f"{base_url}/v1", api_key="test", max_retries=0, timeout=10) as client:
            with client.chat.completions.create(model="m", messages=MESSAGES, stream=True) as stream:
                chunks_seen = list(stream)
            # The client is still connected: only the guard can have stopped the app.
            assert log.closed.wait(5), "the app was not stopped after the stream was ended"
    assert content_and_finish_reasons(chunks_seen) == EXPECTED[action]


@pytest.mark.anyio
@pytest.mark.parametrize("action", [Action.ABORT, Action.FALLBACK])
async def test_the_async_openai_sdk_iterates_a_guarded_stream_to_the_end(action: Action) -> None:
    log = GeneratorLog()
    with serve_in_thread(chat_app(secrets_rules(action), log)) as base_url:
        with anyio.fail_after(10):
            async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="test", max_retries=0) as client:
                stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
                async with stream:
                    chunks = [chunk async for chunk in stream]
    assert content_and_finish_reasons(chunks) == EXPECTED[action]
    assert_app_stopped_early(log, action)


RULE_FILE = """\
version: 1
paths: ["/v1/*"]
rules:
  - name: api-keys
    type: banned_patterns
    patterns: ['(?<![A-Za-z0-9])sk-[A-Za-z0-9]{20,}']
    phrases: ["project starlight"]
    action: %s
fallbacks:
  sorry:
    text: "Sorry, I can't share that."
"""


@pytest.mark.parametrize("action", [Action.ABORT, Action.FALLBACK])
def test_a_rule_file_path_guards_the_stream(tmp_path: Path, action: Action) -> None:
    rule_file = tmp_path / "rules.yaml"
    value = "fallback\n    fallback: sorry" if action is Action.FALLBACK else str(action)
    rule_file.write_text(RULE_FILE % value, encoding="utf-8")
    log = GeneratorLog()
    with serve_in_thread(chat_app(str(rule_file), log)) as base_url:
        chunks = stream_with_sdk(base_url)
    assert content_and_finish_reasons(chunks) == EXPECTED[action]
    assert_app_stopped_early(log, action)
