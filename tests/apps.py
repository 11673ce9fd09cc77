"""Test helpers for driving ASGI apps by hand: OpenAI-style chunk builders, fake streaming apps, a recorder.

Everything here is plain ASGI with no server. Order between the test and an app is forced with
``anyio.Event``: a :class:`SteppedApp` sends one message per :meth:`SteppedApp.step`, so a test can
look at what the client received after each delta.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import anyio
import openai
from openai.types.chat import ChatCompletionMessageParam

from guardrail._types import ASGIApp, Message, Receive, Scope, Send

CHAT_PATH = "/v1/chat/completions"
SSE_HEADERS: tuple[tuple[bytes, bytes], ...] = ((b"content-type", b"text/event-stream; charset=utf-8"),)
JSON_HEADERS: tuple[tuple[bytes, bytes], ...] = ((b"content-type", b"application/json"),)
DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b": keep-alive\n\n"

# --- chunk builders ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatChunks:
    """Builds the SSE events of one OpenAI chat completion stream, all sharing ``id``, ``created`` and ``model``.

    ``ensure_ascii=False`` writes non-ASCII text as raw UTF-8 (as many servers do), so that multi-byte
    characters are really on the wire. By default the JSON has Python's spaces after ``,`` and ``:``
    (what ``json.dumps`` in an app gives), so an event a guard re-rendered never equals the original
    bytes by accident; ``compact=True`` writes it the way OpenAI does.
    """

    id: str = "chatcmpl-test"
    created: int = 1730000000
    model: str = "gpt-test"
    ensure_ascii: bool = True
    compact: bool = False

    def chunk(self, choices: Sequence[Mapping[str, Any]], *, usage: Mapping[str, int] | None = None) -> bytes:
        """One ``chat.completion.chunk`` event with ``choices``."""
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": list(choices),
        }
        if usage is not None:
            obj["usage"] = dict(usage)
        return sse_event(obj, ensure_ascii=self.ensure_ascii, compact=self.compact)

    def role(self, index: int = 0) -> bytes:
        """The first chunk of a choice: the assistant role with empty content."""
        delta = {"role": "assistant", "content": ""}
        return self.chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])

    def content(self, text: str, index: int = 0) -> bytes:
        """A content delta of choice ``index``."""
        return self.chunk([{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])

    def finish(self, reason: str = "stop", index: int = 0) -> bytes:
        """The chunk that ends choice ``index`` with ``reason``."""
        return self.chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}])

    def usage(self, prompt: int = 9, completion: int = 12) -> bytes:
        """The usage chunk (``choices: []``) sent before ``[DONE]`` with ``stream_options.include_usage``."""
        return self.chunk(
            [], usage={"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        )

    def stream(self, deltas: Sequence[str], *, finish: str = "stop") -> list[bytes]:
        """A whole single-choice stream: role, one content chunk per delta, finish, ``[DONE]``."""
        return [self.role(), *(self.content(delta) for delta in deltas), self.finish(finish), DONE]


def sse_event(obj: object, *, ensure_ascii: bool = True, compact: bool = False) -> bytes:
    """``data: <json>`` and a blank line."""
    separators = (",", ":") if compact else (", ", ": ")
    return f"data: {json.dumps(obj, ensure_ascii=ensure_ascii, separators=separators)}\n\n".encode()


# --- what the client saw -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientEvent:
    """One complete event as a client reads it: its raw bytes and its ``data`` (None for comments)."""

    raw: bytes
    data: str | None

    @property
    def json(self) -> Any:
        assert self.data is not None and self.data != "[DONE]", self.raw
        return json.loads(self.data)

    @property
    def is_done(self) -> bool:
        return self.data == "[DONE]"

    @property
    def is_chunk(self) -> bool:
        return self.data is not None and not self.is_done and "choices" in self.json

    @property
    def is_text(self) -> bool:
        """A chunk whose only payload is content text (what a guard may re-render)."""
        if not self.is_chunk:
            return False
        choices = self.json["choices"]
        return bool(choices) and all(
            set(choice["delta"]) == {"content"} and choice["delta"]["content"] and choice.get("finish_reason") is None
            for choice in choices
        )


def split_events(body: bytes) -> list[ClientEvent]:
    """The complete LF-delimited events in ``body`` (an incomplete trailing event is left out)."""
    events: list[ClientEvent] = []
    start = 0
    while (end := body.find(b"\n\n", start)) != -1:
        raw = body[start : end + 2]
        lines = raw.decode("utf-8").split("\n")
        data_lines = [line[5:].removeprefix(" ") for line in lines if line.startswith("data:")]
        events.append(ClientEvent(raw, "\n".join(data_lines) if data_lines else None))
        start = end + 2
    return events


def joined_content(events: Sequence[ClientEvent], index: int = 0) -> str:
    """The content text of choice ``index``, concatenated as the SDK would."""
    parts: list[str] = []
    for event in events:
        if event.is_chunk:
            for choice in event.json["choices"]:
                if choice.get("index", 0) == index and isinstance(choice.get("delta", {}).get("content"), str):
                    parts.append(choice["delta"]["content"])
    return "".join(parts)


def finish_reasons(events: Sequence[ClientEvent]) -> list[tuple[int, str]]:
    """Every ``(choice index, finish_reason)`` in order."""
    return [
        (choice.get("index", 0), choice["finish_reason"])
        for event in events
        if event.is_chunk
        for choice in event.json["choices"]
        if choice.get("finish_reason") is not None
    ]


# --- the raw ASGI harness ---------------------------------------------------------------------


def http_scope(path: str = CHAT_PATH, *, method: str = "POST", spec_version: str = "2.4") -> Scope:
    """A scope for an HTTP request to ``path``, as an ASGI server would build it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }


async def read_body(receive: Receive) -> bytes:
    """The whole request body, as an app reads it from ``receive``."""
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return bytes(body)


class Receiver:
    """An ASGI ``receive``: the request body, then nothing until :meth:`disconnect` is called."""

    def __init__(self, body: bytes = b'{"model":"m","messages":[],"stream":true}') -> None:
        self.body = body
        self._sent_body = False
        self._disconnected = anyio.Event()

    def disconnect(self) -> None:
        self._disconnected.set()

    async def __call__(self) -> Message:
        if not self._sent_body:
            self._sent_body = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self._disconnected.wait()
        return {"type": "http.disconnect"}


class Recorder:
    """An ASGI ``send`` that records every message, as the server would receive them."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.completed = anyio.Event()  # set by the body message with more_body False

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.completed.set()

    def assert_ended_cleanly(self) -> None:
        """The body was completed exactly once, by the last message (what a server needs to end it)."""
        bodies = self.body_messages
        assert bodies, self.messages
        assert [bool(m.get("more_body", False)) for m in bodies].count(False) == 1, self.messages
        assert self.messages[-1] is bodies[-1] and not bodies[-1].get("more_body", False), self.messages[-3:]

    @property
    def start(self) -> Message:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, self.messages
        return starts[0]

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(bytes(name).lower(), bytes(value)) for name, value in self.start.get("headers", [])]

    @property
    def body_messages(self) -> list[Message]:
        return [m for m in self.messages if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        return b"".join(bytes(m.get("body", b"")) for m in self.body_messages)

    @property
    def events(self) -> list[ClientEvent]:
        return split_events(self.body)

    @property
    def content(self) -> str:
        return joined_content(self.events)


@dataclass
class AppLog:
    """What a fake app did: the bodies it tried to send, and how it ended."""

    attempted: list[bytes] = field(default_factory=list)
    cancelled: bool = False
    finished: anyio.Event = field(default_factory=anyio.Event)  # its finally ran


class SteppedApp:
    """A raw ASGI app that sends ``http.response.start``, then one body message per :meth:`step`.

    Each of ``bodies`` goes out as ``{"body": ..., "more_body": True}``; one more step sends the
    final empty body with ``more_body: False``. A step returns once the app's ``send`` has returned,
    so the test sees the client's view right after each delta.
    """

    def __init__(self, bodies: Sequence[bytes], *, headers: Sequence[tuple[bytes, bytes]] = SSE_HEADERS) -> None:
        self.bodies = list(bodies)
        self.headers = list(headers)
        self.log = AppLog()
        self.started = anyio.Event()
        self._steps = 0
        self._permits = [anyio.Event() for _ in range(len(self.bodies) + 1)]
        self._sent = [anyio.Event() for _ in range(len(self.bodies) + 1)]

    @property
    def messages(self) -> list[Message]:
        """The messages this app sends when nothing stops it."""
        start: Message = {"type": "http.response.start", "status": 200, "headers": self.headers}
        bodies: list[Message] = [{"type": "http.response.body", "body": b, "more_body": True} for b in self.bodies]
        return [start, *bodies, {"type": "http.response.body", "body": b"", "more_body": False}]

    async def step(self) -> None:
        """Let the app send its next body message; return once ``send`` has returned to it."""
        number = self._steps
        self._steps += 1
        self._permits[number].set()
        with anyio.fail_after(2):
            await self._sent[number].wait()

    async def run_to_end(self) -> None:
        while self._steps < len(self._permits):
            await self.step()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        messages = self.messages
        try:
            await send(messages[0])
            self.started.set()
            for number, message in enumerate(messages[1:]):
                await self._permits[number].wait()
                self.log.attempted.append(message["body"])
                await send(message)
                self._sent[number].set()
        except anyio.get_cancelled_exc_class():
            self.log.cancelled = True
            raise
        finally:
            self.log.finished.set()


class EndlessApp:
    """A raw ASGI app: ``head`` bodies, then ``tail`` forever (a checkpoint between sends), until cancelled."""

    def __init__(self, head: Sequence[bytes], tail: bytes) -> None:
        self.head = list(head)
        self.tail = tail
        self.log = AppLog()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)})
            number = 0
            while True:
                body = self.head[number] if number < len(self.head) else self.tail
                number += 1
                self.log.attempted.append(body)
                await send({"type": "http.response.body", "body": body, "more_body": True})
                await anyio.sleep(0)
        except anyio.get_cancelled_exc_class():
            self.log.cancelled = True
            raise
        finally:
            self.log.finished.set()


def endless_streaming_response_app(head: Sequence[bytes], tail: bytes, log: AppLog) -> ASGIApp:
    """A Starlette ``StreamingResponse`` app whose generator yields ``head`` then ``tail`` forever."""
    from starlette.responses import StreamingResponse

    async def generate() -> AsyncIterator[bytes]:
        try:
            number = 0
            while True:
                await anyio.sleep(0)
                body = head[number] if number < len(head) else tail
                number += 1
                log.attempted.append(body)
                yield body
        except anyio.get_cancelled_exc_class():
            log.cancelled = True
            raise
        finally:
            log.finished.set()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await StreamingResponse(generate(), media_type="text/event-stream")(scope, receive, send)

    return app


def replay_app(messages: Sequence[Message]) -> ASGIApp:
    """A raw ASGI app that sends ``messages`` as they are, in order."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for message in messages:
            await send(dict(message))

    return app


@dataclass
class Call:
    """An ASGI call running in a task group; ``returned`` is set when it returns without raising."""

    returned: anyio.Event = field(default_factory=anyio.Event)

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        await app(scope, receive, send)
        self.returned.set()


@dataclass
class ThreadLog:
    """What an app running in a server thread did; threading events, since the test waits in another thread."""

    closed: threading.Event = field(default_factory=threading.Event)  # its finally ran
    cancelled: threading.Event = field(default_factory=threading.Event)  # it saw the cancellation
    exhausted: threading.Event = field(default_factory=threading.Event)  # it ran to its end
    sent: list[bytes] = field(default_factory=list)  # the bodies it yielded or sent


def generator_app(generate: Callable[[], AsyncIterator[bytes]], *, middleware: Sequence[Any] = ()) -> ASGIApp:
    """A Starlette app answering ``POST CHAT_PATH`` with a ``StreamingResponse`` over a fresh ``generate()``.

    ``middleware`` (``starlette.middleware.Middleware`` entries) sits where ``app.add_middleware`` puts
    it: inside Starlette's ``ServerErrorMiddleware``, outside its ``ExceptionMiddleware``.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def completions(request: Request) -> StreamingResponse:
        await request.body()
        return StreamingResponse(generate(), media_type="text/event-stream")

    return Starlette(routes=[Route(CHAT_PATH, completions, methods=["POST"])], middleware=list(middleware))


def with_spec_version(app: ASGIApp, spec_version: str) -> ASGIApp:
    """``app``, told that the server speaks ASGI HTTP ``spec_version``.

    Under "2.4" Starlette's ``StreamingResponse`` no longer listens for the disconnect itself (below
    2.4 it does, and stops its own generator), so only the guard is left to stop the app.
    """

    async def versioned(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": spec_version}}
        await app(scope, receive, send)

    return versioned


# --- a real client: the official openai SDK ------------------------------------------------------

SDK_TIMEOUT_SECONDS = 20.0
SDK_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello?"}]


@dataclass
class Received:
    """What the SDK client got: each content piece with when it arrived, finish reasons, the error raised."""

    started: float = field(default_factory=time.monotonic)
    pieces: list[tuple[float, str]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    error: openai.APIError | None = None
    error_at: float | None = None

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.pieces)

    def arrival(self, text: str) -> float:
        return next(at for at, piece in self.pieces if piece == text)


async def stream_with_sdk(base_url: str) -> Received:
    """Stream one chat completion with the official SDK; an ``APIError`` is caught and kept."""
    received = Received()
    async with openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="test", max_retries=0, timeout=SDK_TIMEOUT_SECONDS
    ) as client:
        try:
            stream = await client.chat.completions.create(model="m", messages=SDK_MESSAGES, stream=True)
            async with stream:
                async for chunk in stream:
                    for choice in chunk.choices:
                        if choice.delta.content:
                            received.pieces.append((time.monotonic(), choice.delta.content))
                        if choice.finish_reason is not None:
                            received.finish_reasons.append(str(choice.finish_reason))
        except openai.APIError as exc:
            received.error, received.error_at = exc, time.monotonic()
    return received


class SDKChat(NamedTuple):
    """What the official (sync) SDK made of one streamed chat completion."""

    text: str  # choice content, joined
    finish_reasons: list[str]
    ids: set[str]  # the chunks' ids


def sdk_chat(
    base_url: str,
    prompt: str = "Hello?",
    *,
    model: str = "m",
    api_key: str = "test",
    timeout: float = SDK_TIMEOUT_SECONDS,
    **options: Any,
) -> SDKChat:
    """Stream one chat completion to the end with the official sync SDK (an error it raises propagates)."""
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=timeout) as client:
        with client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], stream=True, **options
        ) as stream:
            chunks = list(stream)
    text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    reasons = [str(c.finish_reason) for chunk in chunks for c in chunk.choices if c.finish_reason is not None]
    return SDKChat(text, reasons, {chunk.id for chunk in chunks})
