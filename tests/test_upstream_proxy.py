"""UpstreamProxy in front of a second local server: pass-through, errors, path joining, closing upstream."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import anyio
import anyio.abc
import httpx
import openai
import pytest
from starlette.types import Message, Receive, Scope, Send

from guardrail.config.urls import join_path
from guardrail.exceptions import UpstreamStreamError
from guardrail.proxy.demo import DemoModel, answer_for
from guardrail.proxy.upstream import UpstreamProxy
from tests.apps import read_body
from tests.servers import serve_in_thread

TIMEOUT = 10.0


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path: str
    query: bytes
    headers: dict[str, str]
    body: bytes


class FakeUpstream:
    """A small OpenAI-ish upstream. Requests are told apart by their ``x-test-id`` header.

    Routes, matched on the path's last segment: ``completions`` (the demo model), ``error``
    (status from ``?status=``), ``slow`` (never answers), ``endless`` (streams until the client
    leaves), ``gated`` (one event, then the rest once the test opens the gate); anything else
    echoes the request as JSON.
    """

    def __init__(self) -> None:
        self.seen: dict[str, Seen] = {}
        self.gone: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.gates: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.demo = DemoModel(seconds_per_token=0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.demo(scope, receive, send)
            return
        headers = {name.decode(): value.decode() for name, value in scope["headers"]}
        test_id = headers.get("x-test-id", "")
        body = await read_body(receive)
        self.seen[test_id] = Seen(scope["method"], scope["path"], scope["query_string"], headers, body)
        route = scope["path"].rsplit("/", 1)[-1]
        if route == "completions":
            replayed: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

            async def replay() -> Message:
                return replayed.pop() if replayed else await receive()

            await self.demo(scope, replay, send)
        elif route == "error":
            status = int(dict(pair.split("=") for pair in scope["query_string"].decode().split("&"))["status"])
            await json_response(send, {"error": {"message": "nope", "type": "rate_limit"}}, status=status)
        elif route in ("slow", "endless", "gated"):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._stream, route, test_id, send)
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.gone[test_id].set()
                task_group.cancel_scope.cancel()
        else:
            extra = [(b"x-upstream", b"yes"), (b"connection", b"x-upstream-hop"), (b"x-upstream-hop", b"1")]
            await json_response(send, {"seen": headers, "body": body.decode()}, extra=[*extra, (b"set-cookie", b"s=1")])

    async def _stream(self, route: str, test_id: str, send: Send) -> None:
        if route == "slow":
            await anyio.sleep_forever()
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"data: one\n\n", "more_body": True})
        if route == "gated":
            while not self.gates[test_id].is_set():
                await anyio.sleep(0.005)
            await send({"type": "http.response.body", "body": b"data: two\n\n", "more_body": False})
            return
        while True:
            await anyio.sleep(0.01)
            await send({"type": "http.response.body", "body": b"data: more\n\n", "more_body": True})


async def json_response(
    send: Send, payload: object, *, status: int = 200, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


@pytest.fixture(scope="module")
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture(scope="module")
def upstream_url(upstream: FakeUpstream) -> Iterator[str]:
    with serve_in_thread(upstream) as url:
        yield url


@pytest.fixture
def test_id() -> str:
    return uuid.uuid4().hex


@pytest.fixture
async def proxy_client(upstream_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client calling an in-process proxy (end-state checks only: ASGITransport buffers)."""
    async with UpstreamProxy(upstream_url) as proxy:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy), base_url="http://proxy") as client:
            yield client


def http_scope(path: str, *, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers or [],
    }


def connected_client() -> Receive:
    """An ASGI ``receive`` for a body-less request whose client stays connected."""
    messages: list[Message] = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> Message:
        if messages:
            return messages.pop()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    return receive


@pytest.mark.parametrize(
    ("base", "request_path", "expected"),
    [
        ("/v1", "/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/", "/v1/models", "/v1/models"),
        ("", "/v1/chat/completions", "/v1/chat/completions"),
        ("/", "/v1/models", "/v1/models"),
        ("/api", "/v1/chat/completions", "/api/v1/chat/completions"),
        ("/openai/v1", "/v1/chat/completions", "/openai/v1/chat/completions"),
        ("/api", "/api-docs", "/api/api-docs"),
        ("/v1", "/v1", "/v1"),
        ("/v1", "/", "/v1/"),
    ],
)
def test_join_path(base: str, request_path: str, expected: str) -> None:
    assert join_path(base, request_path) == expected


@pytest.mark.anyio
async def test_target_url_keeps_escapes_and_merges_queries() -> None:
    async with UpstreamProxy("http://user:pw@h:1/openai/v1?api-version=2024") as proxy:
        url = proxy.target_url(b"/v1/models/org%2Fm", b"limit=2")
    assert str(url) == "http://user:pw@h:1/openai/v1/models/org%2Fm?api-version=2024&limit=2"


def test_rejects_a_relative_upstream() -> None:
    with pytest.raises(ValueError, match="absolute"):
        UpstreamProxy("/v1")


@pytest.mark.anyio
async def test_forwards_end_to_end_headers_only(
    proxy_client: httpx.AsyncClient, upstream_url: str, upstream: FakeUpstream, test_id: str
) -> None:
    headers = {
        "x-test-id": test_id,
        "authorization": "Bearer sk-test-123",
        "openai-organization": "org-1",
        "accept-encoding": "gzip, br",
        "connection": "keep-alive, x-hop",
        "x-hop": "1",
        "keep-alive": "timeout=5",
        "te": "trailers",
        "proxy-authorization": "Basic cHJveHk6cHc=",
        "upgrade": "h2c",
    }
    with anyio.fail_after(TIMEOUT):
        response = await proxy_client.post("/v1/echo", params={"q": "1"}, headers=headers, content=b'{"a": 1}')
    seen = upstream.seen[test_id]
    assert (seen.method, seen.path, seen.query, seen.body) == ("POST", "/v1/echo", b"q=1", b'{"a": 1}')
    assert seen.headers["authorization"] == "Bearer sk-test-123"
    assert seen.headers["openai-organization"] == "org-1"
    assert seen.headers["accept-encoding"] == "identity"
    assert seen.headers["content-length"] == "8"
    assert seen.headers["host"] == upstream_url.removeprefix("http://")
    for dropped in ("x-hop", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert dropped not in seen.headers
    assert "x-hop" not in seen.headers.get("connection", "")
    # and on the way back
    assert response.status_code == 200
    assert response.headers["x-upstream"] == "yes"
    assert "x-upstream-hop" not in response.headers
    assert "connection" not in response.headers


@pytest.mark.anyio
async def test_streams_a_chunked_request_body(
    proxy_client: httpx.AsyncClient, upstream: FakeUpstream, test_id: str
) -> None:
    async def body() -> AsyncIterator[bytes]:
        for part in (b"first ", b"second ", b"third"):
            yield part

    with anyio.fail_after(TIMEOUT):
        response = await proxy_client.post("/v1/echo", headers={"x-test-id": test_id}, content=body())
    assert response.status_code == 200
    seen = upstream.seen[test_id]
    assert seen.body == b"first second third"
    assert seen.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in seen.headers


@pytest.mark.anyio
async def test_cookies_are_not_kept_between_requests(
    proxy_client: httpx.AsyncClient, upstream: FakeUpstream, test_id: str
) -> None:
    with anyio.fail_after(TIMEOUT):
        first = await proxy_client.get("/v1/echo", headers={"x-test-id": test_id + "a"})
        proxy_client.cookies.clear()  # the test's own client keeps cookies; the proxy must not
        await proxy_client.get("/v1/echo", headers={"x-test-id": test_id + "b"})
    assert first.headers["set-cookie"] == "s=1"
    assert "cookie" not in upstream.seen[test_id + "b"].headers


@pytest.mark.anyio
@pytest.mark.parametrize(("base", "expected"), [("/v1", "/v1/echo"), ("/api", "/api/v1/echo")])
async def test_path_joining_end_to_end(
    upstream_url: str, upstream: FakeUpstream, test_id: str, base: str, expected: str
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with UpstreamProxy(upstream_url + base) as proxy:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy), base_url="http://p") as client:
                await client.get("/v1/echo", headers={"x-test-id": test_id})
    assert upstream.seen[test_id].path == expected


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 429, 500, 503])
async def test_upstream_errors_pass_through(proxy_client: httpx.AsyncClient, status: int) -> None:
    with anyio.fail_after(TIMEOUT):
        response = await proxy_client.post("/v1/error", params={"status": str(status)}, json={})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": {"message": "nope", "type": "rate_limit"}}


@pytest.mark.anyio
async def test_unreachable_upstream_is_a_502_envelope() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with anyio.fail_after(TIMEOUT):
        async with UpstreamProxy(f"http://127.0.0.1:{port}/v1") as proxy:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy), base_url="http://p") as client:
                response = await client.post("/v1/chat/completions", json={})
    assert response.status_code == 502
    assert response.json() == {
        "error": {
            "message": "The upstream model server could not be reached.",
            "type": "upstream_error",
            "param": None,
            "code": "upstream_unreachable",
        }
    }


@pytest.mark.anyio
async def test_upstream_timeout_is_a_504_envelope(upstream_url: str, upstream: FakeUpstream, test_id: str) -> None:
    with anyio.fail_after(TIMEOUT):
        async with UpstreamProxy(upstream_url, timeout=httpx.Timeout(5.0, read=0.2)) as proxy:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy), base_url="http://p") as client:
                response = await client.get("/v1/slow", headers={"x-test-id": test_id})
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        assert await anyio.to_thread.run_sync(upstream.gone[test_id].wait, TIMEOUT)


@pytest.mark.anyio
async def test_sdk_streams_through_the_proxy_over_sockets(
    upstream_url: str, upstream: FakeUpstream, test_id: str
) -> None:
    proxy = UpstreamProxy(upstream_url + "/v1")
    with serve_in_thread(proxy) as proxy_url:
        with anyio.fail_after(TIMEOUT):
            async with openai.AsyncOpenAI(
                base_url=proxy_url + "/v1", api_key="sk-test-123", max_retries=0, default_headers={"x-test-id": test_id}
            ) as client:
                stream = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "roadmap?"}], stream=True
                )
                text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                completion = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}]
                )
    assert text == answer_for("roadmap?")
    assert completion.choices[0].message.content == answer_for("hi")
    assert upstream.seen[test_id].headers["authorization"] == "Bearer sk-test-123"


@pytest.mark.anyio
async def test_chunks_are_relayed_as_they_arrive(upstream_url: str, upstream: FakeUpstream, test_id: str) -> None:
    sent: list[Message] = []
    first_chunk = anyio.Event()

    async def send(message: Message) -> None:
        sent.append(message)
        if message.get("body"):
            first_chunk.set()

    scope = http_scope("/v1/gated", headers=[(b"x-test-id", test_id.encode())])
    with anyio.fail_after(TIMEOUT):
        async with UpstreamProxy(upstream_url) as proxy, anyio.create_task_group() as task_group:
            task_group.start_soon(proxy, scope, connected_client(), send)
            await first_chunk.wait()
            assert [m.get("body") for m in sent[1:]] == [b"data: one\n\n"]  # before the upstream sends more
            upstream.gates[test_id].set()
    assert sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream") in sent[0]["headers"]
    assert [(m["body"], m["more_body"]) for m in sent[1:]] == [
        (b"data: one\n\n", True),
        (b"data: two\n\n", True),
        (b"", False),
    ]


@pytest.mark.anyio
async def test_cancelling_the_app_closes_the_upstream(upstream_url: str, upstream: FakeUpstream, test_id: str) -> None:
    streaming = anyio.Event()

    async def send(message: Message) -> None:
        if message.get("body"):
            streaming.set()

    scope = http_scope("/v1/endless", headers=[(b"x-test-id", test_id.encode())])
    with anyio.fail_after(TIMEOUT):
        async with UpstreamProxy(upstream_url) as proxy:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(proxy, scope, connected_client(), send)
                await streaming.wait()
                task_group.cancel_scope.cancel()  # what the guard does after an abort
            assert await anyio.to_thread.run_sync(upstream.gone[test_id].wait, TIMEOUT)


@pytest.mark.anyio
async def test_failing_send_closes_the_upstream(upstream_url: str, upstream: FakeUpstream, test_id: str) -> None:
    async def send(message: Message) -> None:
        if message.get("body"):
            raise OSError("connection reset by peer")  # how some ASGI servers report a gone client

    scope = http_scope("/v1/endless", headers=[(b"x-test-id", test_id.encode())])
    with anyio.fail_after(TIMEOUT):
        async with UpstreamProxy(upstream_url) as proxy:
            await proxy(scope, connected_client(), send)  # returns quietly
            assert await anyio.to_thread.run_sync(upstream.gone[test_id].wait, TIMEOUT)


@pytest.mark.anyio
async def test_client_disconnect_closes_the_upstream(upstream_url: str, upstream: FakeUpstream, test_id: str) -> None:
    proxy = UpstreamProxy(upstream_url)
    with serve_in_thread(proxy) as proxy_url:
        with anyio.fail_after(TIMEOUT):
            async with httpx.AsyncClient(base_url=proxy_url) as client:
                async with client.stream("GET", "/v1/endless", headers={"x-test-id": test_id}) as response:
                    async for chunk in response.aiter_raw():
                        assert chunk.startswith(b"data: ")
                        break
                # Leaving the block closed the unfinished response's connection.
            assert await anyio.to_thread.run_sync(upstream.gone[test_id].wait, TIMEOUT)


@pytest.mark.anyio
async def test_upstream_dropping_mid_stream_raises() -> None:
    async def half_a_response(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive()
            head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            await stream.send(head + b"a\r\ndata: hi\n\n\r\n")

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(TIMEOUT):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as task_group:
            task_group.start_soon(listener.serve, half_a_response)
            async with UpstreamProxy(f"http://127.0.0.1:{port}") as proxy:
                with pytest.raises(UpstreamStreamError) as caught:
                    await proxy(http_scope("/v1/chat/completions"), connected_client(), send)
            task_group.cancel_scope.cancel()
    assert isinstance(caught.value.__cause__, httpx.RemoteProtocolError)
    assert sent[0]["status"] == 200
    assert [m["body"] for m in sent[1:]] == [b"data: hi\n\n"]
