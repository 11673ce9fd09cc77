"""No spelling of a path walks around the guard: each trick is guarded or refused, proxy and middleware.

The upstream (for the proxy) and the app's router (for the middleware) answer *every* path with
the key, the way servers that normalise paths do; the client sends each path byte for byte
(``http.client`` does not normalise). Every answer either shows no key or is a refusal.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Mount, Route

from guardrail.asgi import GuardrailMiddleware
from guardrail.config import RuleSet
from guardrail.core.rule import Action, BoundRule
from guardrail.proxy.app import ServeSettings, build_app
from guardrail.rules.banned import BannedPatterns
from tests.apps import ChatChunks
from tests.servers import serve_in_thread

KEY = "sk-" + "Zq9Xw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe"
RULES = RuleSet.from_rules(
    [BoundRule("keys", BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"]), Action.REDACT)], paths=["/v1/*"]
)
TRICKS = [
    "/v1/chat/completions",
    "/v1/./chat/completions",
    "/v1/../v1/chat/completions",
    "/v1/x/../chat/completions",
    "/./v1/chat/completions",
    "/v1/./chat/./completions/.",
    "/v1//chat/completions",
    "//v1/chat/completions",
    "/v1/chat//completions",
    "/v1/chat/completions/",
    "/v1/chat/completions//",
    "/v1/chat/completions;x=1",
    "/v1;x=1/chat/completions",
    "/v1/chat/completions%20",
    "/v1/chat%2Fcompletions",
    "/v1/chat%2fcompletions",
    "/v1%2Fchat%2Fcompletions",
    "/v1/%2e/chat/completions",
    "/v1/%2E%2E/v1/chat/completions",
    "/v1/chat/%63ompletions",
    "/V1/CHAT/COMPLETIONS",
    "/v1/Chat/Completions",
    "/v1/chat/completions%00",
    "/v1/chat%5ccompletions",
    "/v1/chat/completions%252e",
    "/v1/chat/completions%2",
    "/v1/chat/completions?x=/../",
    "/v1/chat/completions/..",
    "/v1/chat/completions/../completions",
    "/v1/../../v1/chat/completions",
    "/v1/" + "a/" * 5000 + "../" * 5000 + "chat/completions",
]
MESSAGES = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def answer(request: Request) -> StreamingResponse:
    """Whatever the path, a streamed answer with the key (a server that normalises paths)."""
    request.app.state.paths.append(request.url.path)

    async def body() -> AsyncIterator[bytes]:
        for event in ChatChunks().stream(["Your key: ", KEY[:9], KEY[9:], " ok"]):
            yield event

    return StreamingResponse(body(), media_type="text/event-stream")


def everything_app() -> Starlette:
    app = Starlette(routes=[Route("/{path:path}", answer, methods=["POST"])])
    app.state.paths = []
    return app


def post_raw(base_url: str, path: str) -> tuple[int, bytes]:
    """POST to ``path`` exactly as written (no client-side normalisation)."""
    netloc = urlsplit(base_url).netloc
    connection = http.client.HTTPConnection(netloc, timeout=10)
    try:
        connection.putrequest("POST", path, skip_accept_encoding=True)
        body = json.dumps(MESSAGES).encode()
        connection.putheader("content-type", "application/json")
        connection.putheader("content-length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def assert_guarded_or_refused(status: int, body: bytes, path: str) -> None:
    assert KEY[3:12].encode() not in body, f"{path!r} reached the client unguarded"
    assert status in (200, 400, 403, 404, 405), (path, status)


@pytest.fixture(scope="module")
def proxy() -> Iterator[tuple[str, Starlette]]:
    upstream = everything_app()
    with serve_in_thread(upstream) as upstream_url:
        app = build_app(ServeSettings(("rules/default.yaml",), upstream_url), rules=RULES, registry=CollectorRegistry())
        with serve_in_thread(app) as base_url:
            yield base_url, upstream


@pytest.mark.parametrize("path", TRICKS)
def test_the_proxy_guards_or_refuses_every_spelling_of_a_path(proxy: tuple[str, Starlette], path: str) -> None:
    base_url, upstream = proxy
    upstream.state.paths.clear()
    status, body = post_raw(base_url, path)
    assert_guarded_or_refused(status, body, path)
    # What reached the upstream is the path that was guarded, spelled as the guard read it.
    assert set(upstream.state.paths) <= {"/v1/chat/completions"}
    if upstream.state.paths:
        assert b"[redacted]" in body
    if path == "/v1/chat/completions":
        assert upstream.state.paths == [path]


def guarded_app(mount: str | None) -> Starlette:
    inner = everything_app()
    inner.add_middleware(GuardrailMiddleware, rules=RULES)
    if mount is None:
        return inner
    outer = Starlette(routes=[Mount(mount, app=inner)])
    outer.state.paths = inner.state.paths
    return outer


@pytest.mark.parametrize("setup", ["plain", "mounted", "root_path"])
@pytest.mark.parametrize("path", TRICKS)
def test_the_middleware_guards_or_refuses_every_spelling_of_a_path(setup: str, path: str) -> None:
    # Mounted: the client sends the prefix. Under --root-path: a proxy in front already stripped it.
    prefix = "/api" if setup == "mounted" else ""
    app = guarded_app("/api" if setup == "mounted" else None)
    config = {"root_path": "/api"} if setup == "root_path" else {}
    with serve_in_thread(app, **config) as base_url:
        status, body = post_raw(base_url, prefix + path)
    assert_guarded_or_refused(status, body, prefix + path)
    if path == "/v1/chat/completions":
        assert b"[redacted]" in body  # the guard is on, not just the route off


def raw_request(base_url: str, request: bytes) -> bytes:
    """Send ``request`` as raw bytes; the raw answer."""
    import socket

    netloc = urlsplit(base_url).netloc
    host, port = netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"HEAD /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.0\r\ncontent-length: 2\r\n\r\n{}",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 14\r\n\r\n"
        b'{"model": "m"}',
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 5\r\n\r\n[1,2]",
        b"POST /v1/" + b"a" * 65536 + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"POST /v1/chat/completions%zz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    ],
    ids=["head", "http-1.0", "no-body", "no-messages", "array-body", "64k-path", "bad-escape"],
)
def test_hostile_requests_get_an_answer_and_never_the_key(proxy: tuple[str, Starlette], request_bytes: bytes) -> None:
    base_url, _ = proxy
    answer = raw_request(base_url, request_bytes)
    assert answer.startswith(b"HTTP/1.")
    assert KEY[3:12].encode() not in answer
