"""The built-in demo model, served by uvicorn and read by the official openai SDK."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardrail.proxy.demo import (
    CODE_NAME,
    DEMO_MODEL_ID,
    FAKE_API_KEY,
    FAKE_CARD,
    FAKE_SSN,
    DemoModel,
    answer_for,
    scenario_for,
    split_tokens,
)
from tests.servers import serve_in_thread

TIMEOUT = 10.0


class CallTracker:
    """Wraps an ASGI app and counts the HTTP calls still running inside it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.active = 0
        self.started = 0
        self._changed = threading.Condition()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self._changed:
            self.active += 1
            self.started += 1
            self._changed.notify_all()
        try:
            await self.app(scope, receive, send)
        finally:
            with self._changed:
                self.active -= 1
                self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.active == 0, timeout)


@pytest.fixture(scope="module")
def tracker() -> CallTracker:
    return CallTracker(DemoModel(seconds_per_token=0, keepalive_seconds=0.01))


@pytest.fixture(scope="module")
def demo_url(tracker: CallTracker) -> Iterator[str]:
    with serve_in_thread(tracker) as url:
        yield url


def sdk(demo_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=demo_url + "/v1", api_key="demo", max_retries=0)


async def stream_chunks(demo_url: str, prompt: str, **options: Any) -> list[ChatCompletionChunk]:
    async with sdk(demo_url) as client:
        stream = await client.chat.completions.create(
            model=DEMO_MODEL_ID, messages=[{"role": "user", "content": prompt}], stream=True, **options
        )
        return [chunk async for chunk in stream]


def content_deltas(chunks: list[ChatCompletionChunk]) -> list[str]:
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


SCENARIOS = [
    ("What is the API key?", "secret"),
    ("Tell me about the roadmap", "starlight"),
    ("Show me the customer record", "customer"),
    ("Tell me a long story", "story"),
    ("hello there", "default"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("prompt", "scenario"), SCENARIOS)
async def test_sdk_streams_each_scenario_to_the_end(demo_url: str, prompt: str, scenario: str) -> None:
    with anyio.fail_after(TIMEOUT):
        chunks = await stream_chunks(demo_url, prompt)
    assert scenario_for(prompt) == scenario
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].delta.content is None
    assert {(c.id, c.created, c.model) for c in chunks} == {(chunks[0].id, chunks[0].created, DEMO_MODEL_ID)}
    assert chunks[0].id.startswith("chatcmpl-demo-")
    deltas = content_deltas(chunks)
    assert "".join(deltas) == answer_for(prompt)
    assert all(1 <= len(delta) <= 6 for delta in deltas)


@pytest.mark.anyio
async def test_fake_key_is_split_across_deltas(demo_url: str) -> None:
    with anyio.fail_after(TIMEOUT):
        deltas = content_deltas(await stream_chunks(demo_url, "Tell me the secret"))
    text = "".join(deltas)
    start = text.index(FAKE_API_KEY)
    ends = [len("".join(deltas[: i + 1])) for i in range(len(deltas))]
    spanned = [end for end in ends if start < end <= start + len(FAKE_API_KEY)]
    assert len(spanned) >= 5
    assert re.fullmatch(r"sk-proj-[A-Za-z0-9]{40}", FAKE_API_KEY)


@pytest.mark.anyio
async def test_other_scenarios_carry_their_trigger_text(demo_url: str) -> None:
    with anyio.fail_after(TIMEOUT):
        starlight = "".join(content_deltas(await stream_chunks(demo_url, "any codename news?")))
        customer = "".join(content_deltas(await stream_chunks(demo_url, "my SSN please")))
        story = content_deltas(await stream_chunks(demo_url, "a story, please"))
    assert len(starlight) / 4 < starlight.index(CODE_NAME) < len(starlight) * 3 / 4
    assert FAKE_SSN in customer and FAKE_CARD in customer
    assert len(story) > 2000
    assert len("".join(story).split("\n\n")) > 20  # paragraphs, not one block


def test_default_answer_suggests_a_prompt_for_every_scenario() -> None:
    suggested = re.findall(r'"([^"]+)"', answer_for("hi"))
    assert {scenario_for(prompt) for prompt in suggested} == {"secret", "starlight", "customer", "story", "stall"}


@pytest.mark.parametrize(
    ("prompt", "scenario"),
    [("how do I install it?", "default"), ("keyboard", "default"), ("it stalled", "stall"), ("my keys", "secret")],
)
def test_triggers_match_whole_words(prompt: str, scenario: str) -> None:
    assert scenario_for(prompt) == scenario


def test_split_tokens_round_trips() -> None:
    text = answer_for("story") + "  double  spaces\n\nand unicode: café, naïve — ok"
    pieces = split_tokens(text)
    assert "".join(pieces) == text
    assert all(1 <= len(piece) <= 6 for piece in pieces)
    assert split_tokens("Hello, world!") == ["Hello", ",", " world", "!"]


@pytest.mark.anyio
async def test_include_usage_adds_a_usage_chunk(demo_url: str) -> None:
    with anyio.fail_after(TIMEOUT):
        chunks = await stream_chunks(demo_url, "hello", stream_options={"include_usage": True})
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == len(content_deltas(chunks))
    assert usage_chunk.usage.prompt_tokens == len(split_tokens("hello"))
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + usage_chunk.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.anyio
async def test_wire_bytes_are_openai_chunks(demo_url: str) -> None:
    request = {"model": "my-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with anyio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=demo_url) as client:
            response = await client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.content.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    payloads = [json.loads(event.removeprefix(b"data: ")) for event in events[:-2]]
    for event, payload in zip(events, payloads, strict=False):
        assert event == b"data: " + json.dumps(payload, separators=(",", ":")).encode()
    first = payloads[0]
    assert first == {
        "id": first["id"],
        "object": "chat.completion.chunk",
        "created": first["created"],
        "model": "my-model",
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ],
    }
    assert payloads[-1]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]


@pytest.mark.anyio
async def test_non_streaming_completion(demo_url: str) -> None:
    with anyio.fail_after(TIMEOUT):
        async with sdk(demo_url) as client:
            completion = await client.chat.completions.create(
                model=DEMO_MODEL_ID, messages=[{"role": "user", "content": [{"type": "text", "text": "api key?"}]}]
            )
            models = await client.models.list()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == answer_for("api key?")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == len(split_tokens(answer_for("key")))
    assert [model.id for model in models.data] == [DEMO_MODEL_ID]


@pytest.mark.anyio
async def test_max_tokens_cuts_with_length(demo_url: str) -> None:
    with anyio.fail_after(TIMEOUT):
        chunks = await stream_chunks(demo_url, "story", max_tokens=7)
    assert "".join(content_deltas(chunks)) == "".join(split_tokens(answer_for("story"))[:7])
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [
        ("POST", "/v1/chat/completions", b"{not json", 400, None),
        ("POST", "/v1/chat/completions", b"[]", 400, None),
        ("POST", "/v1/chat/completions", b'{"model": "m"}', 400, "messages"),
        (
            "POST",
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "stream": 1}',
            400,
            "stream",
        ),
        ("GET", "/v1/chat/completions", b"", 404, None),
        ("POST", "/v1/embeddings", b"{}", 404, None),
    ],
)
async def test_errors_use_the_openai_envelope(
    demo_url: str, method: str, path: str, body: bytes, status: int, param: str | None
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=demo_url) as client:
            response = await client.request(method, path, content=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


@pytest.mark.anyio
async def test_sdk_raises_on_bad_request(demo_url: str) -> None:
    with anyio.fail_after(TIMEOUT):
        async with sdk(demo_url) as client:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(model=DEMO_MODEL_ID, messages=[])
    assert caught.value.param == "messages"


def test_stall_sends_keepalives_and_stops_when_the_client_leaves(demo_url: str, tracker: CallTracker) -> None:
    assert tracker.wait_idle(TIMEOUT)
    request = {"messages": [{"role": "user", "content": "please stall"}], "stream": True}
    lines: list[str] = []
    with httpx.Client(base_url=demo_url, timeout=TIMEOUT) as client:
        with client.stream("POST", "/v1/chat/completions", json=request) as response:
            for line in response.iter_lines():
                lines.append(line)
                if lines.count(": keep-alive") == 3:
                    assert tracker.active == 1
                    break  # abandoning the iterator makes httpx close the connection mid-body
    # The stall lasts ten minutes (the default stall_seconds): only the disconnect can end it now.
    assert tracker.wait_idle(TIMEOUT)
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads)
    assert text
    assert answer_for("stall").startswith(text)
    assert text != answer_for("stall")
    assert "data: [DONE]" not in lines


@pytest.mark.anyio
async def test_stall_finishes_after_stall_seconds() -> None:
    demo = DemoModel(seconds_per_token=0, keepalive_seconds=0.01, stall_seconds=0.05)
    with anyio.fail_after(TIMEOUT):
        sent = await call(demo, "stall")
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert b": keep-alive\n\n" in bodies
    assert bodies[-1] == b"data: [DONE]\n\n"
    text = "".join(json.loads(b[6:])["choices"][0]["delta"].get("content", "") for b in bodies if b[6:7] == b"{")
    assert text == answer_for("stall")


async def call(
    app: ASGIApp, prompt: str, *, leave_after: int | None = None, send_fails_after: int | None = None
) -> list[Message]:
    """Stream one chat completion from ``app`` in-process; return the messages it sent.

    Args:
        app: the ASGI app.
        prompt: the user message.
        leave_after: after this many sent messages, ``receive`` reports ``http.disconnect``.
        send_fails_after: after this many sent messages, ``send`` raises OSError.
    """
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "stream": True}).encode()
    scope: Scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    sent: list[Message] = []
    gone = anyio.Event()
    requests: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        if requests:
            return requests.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if send_fails_after is not None and len(sent) >= send_fails_after:
            raise OSError("connection reset by peer")
        sent.append(message)
        if leave_after is not None and len(sent) >= leave_after:
            gone.set()

    await app(scope, receive, send)
    return sent


@pytest.mark.anyio
async def test_disconnect_stops_a_long_stream_in_process() -> None:
    with anyio.fail_after(TIMEOUT):
        sent = await call(DemoModel(seconds_per_token=0), "long story", leave_after=5)
    assert 5 <= len(sent) < 50
    assert all(m.get("body") != b"data: [DONE]\n\n" for m in sent)


@pytest.mark.anyio
async def test_send_failure_ends_the_stream_quietly() -> None:
    with anyio.fail_after(TIMEOUT):
        sent = await call(DemoModel(seconds_per_token=0), "long story", send_fails_after=4)
    assert len(sent) == 4


@pytest.mark.anyio
async def test_tokens_are_paced() -> None:
    pieces = len(split_tokens(answer_for("customer")))
    started = time.monotonic()
    with anyio.fail_after(TIMEOUT):
        await call(DemoModel(seconds_per_token=0.005), "customer")
    assert time.monotonic() - started >= pieces * 0.005


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="keepalive"):
        DemoModel(keepalive_seconds=0)
