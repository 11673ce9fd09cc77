"""The proxy's plain forwarding half: an ASGI app that relays requests to an upstream model server.

`UpstreamProxy` forwards each HTTP request to an OpenAI-compatible upstream with httpx
streaming, as Tom Christie suggests in encode/httpx#830: ``client.build_request`` and
``client.send(request, stream=True)``, relay ``aiter_raw()`` chunk by chunk, ``aclose()`` in
``finally``. It does not guard anything itself; `GuardrailMiddleware` wraps it.

Failures before the response has started become an HTTP error in OpenAI's envelope (502 when
the upstream cannot be reached, 504 when it times out); both are retryable, so the SDKs' own
retries still apply. A failure after the response has started cannot be expressed in any
dialect from here, so `UpstreamStreamError` is raised for the middleware around this app to
end the stream in the client's dialect.

When the client goes away, or the task running the app is cancelled (the guard does this
after an abort), the upstream response is closed, so the upstream model stops generating.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from http.cookiejar import CookieJar, DefaultCookiePolicy
from types import TracebackType
from typing import cast
from urllib.parse import quote

import anyio
import httpx

from guardrail._asgi import openai_error, send_json, send_response, serve_lifespan
from guardrail._types import Message, Receive, Scope, Send
from guardrail.asgi.branch import display_url
from guardrail.config.urls import join_path
from guardrail.core.dialects import dialect_for_path, get_dialect
from guardrail.exceptions import UpstreamStreamError
from guardrail.proxy.headers import client_response_headers, upstream_request_headers

logger = logging.getLogger(__name__)

# Matches the openai SDK's own default: a long non-streaming completion may take minutes to
# its first byte. Stalls inside a stream are the guard's idle timeout's business.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)

# httpx's default of 100 connections would queue the 101st concurrent stream behind the pool
# timeout; a proxy holds one upstream connection per stream in flight.
DEFAULT_LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=100)

# How long /readyz waits for the upstream to answer.
PROBE_TIMEOUT = httpx.Timeout(3.0)

# Bounds the shielded close of an upstream response, which must not hang a cancelled task.
_CLOSE_TIMEOUT_SECONDS = 5.0

# Characters left as they are when a request path or query is copied into the upstream URL:
# everything valid there (RFC 3986 unreserved, sub-delims, ":@/?" and existing %-escapes).
_URL_SAFE = "/?:@!$&'()*+,;=-._~%"

_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


class _ClientGone(Exception):
    """The client disconnected while its request body was still being read."""


def _no_cookie_jar() -> CookieJar:
    # A shared client must never store a Set-Cookie from one user's response and send it with
    # the next user's request; cookies still pass through as ordinary headers.
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


class UpstreamProxy:
    """ASGI app forwarding HTTP requests to an upstream base URL, streaming both bodies.

    The method, path (see `join_path`), query string, body and end-to-end headers go upstream;
    hop-by-hop headers are dropped both ways (see `guardrail.proxy.headers`). The upstream's
    status and headers come back, and its body is relayed as it arrives: each chunk read from
    the upstream is one ``http.response.body`` message.

    Only method and path are ever logged, never headers, query strings or bodies.

    Use it as an async context manager, or let ASGI lifespan close it, so the client it owns
    is closed.
    """

    def __init__(
        self,
        upstream: str,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> None:
        """Create the app.

        Args:
            upstream: the upstream base URL, e.g. ``https://api.openai.com/v1``. A query string
                in it is sent with every request, before the client's own.
            client: an httpx client to use and leave open; by default the app builds and owns
                one that keeps no cookies (a client passed in keeps its own cookie policy).
            timeout: per-request timeouts; defaults to `DEFAULT_TIMEOUT` for the app's own
                client, and to the client's timeouts for a client passed in.

        Raises:
            ValueError: the upstream URL is not an absolute http or https URL.
        """
        url = httpx.URL(upstream)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"upstream must be an absolute http(s) URL, got scheme {url.scheme!r}")
        self._base = url.copy_with(fragment=None)
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(limits=DEFAULT_LIMITS, cookies=_no_cookie_jar())
        self._timeout = timeout or (DEFAULT_TIMEOUT if client is None else client.timeout)

    def target_url(self, raw_path: bytes, query_string: bytes = b"") -> httpx.URL:
        """The upstream URL for a request path and query string.

        Args:
            raw_path: the request path as sent by the client (percent-encoded).
            query_string: the request's query string, without ``?``.

        Returns:
            The absolute upstream URL: see `join_path` for the path.
        """
        path = join_path(self._base.raw_path.split(b"?", 1)[0].decode("ascii"), quote(raw_path, safe=_URL_SAFE))
        query = "&".join(part for part in (self._base.query.decode("ascii"), quote(query_string, _URL_SAFE)) if part)
        target = path + "?" + query if query else path
        return self._base.copy_with(raw_path=target.encode("ascii"))

    async def probe(self) -> str | None:
        """Whether the upstream can be reached: None if it answers HTTP at all (any status), else why not.

        A ``GET`` of the base URL, without the client's headers (so without credentials), for
        ``/readyz``; the answer's body is not read.
        """
        request = self._client.build_request("GET", self._base, timeout=PROBE_TIMEOUT)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException:
            return f"{display_url(self._base)} timed out"
        except httpx.HTTPError as exc:
            return f"{display_url(self._base)} cannot be reached ({type(exc).__name__})"
        await response.aclose()
        return None

    async def aclose(self) -> None:
        """Close the httpx client if this app created it."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> UpstreamProxy:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward one ASGI connection.

        Raises:
            UpstreamStreamError: the upstream failed after the response had started.
        """
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send, on_shutdown=self.aclose)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})  # refused: not proxied
        elif scope["type"] == "http":
            await self._forward(scope, receive, send)

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        raw_path: bytes = scope.get("raw_path") or path.encode("utf-8")
        logger.debug("forwarding %s %s", method, path)
        headers = upstream_request_headers(scope["headers"])
        body_read = anyio.Event()
        has_body = _has_body(scope, headers)
        if not has_body:
            body_read.set()
        request = self._client.build_request(
            method,
            self.target_url(raw_path, scope.get("query_string", b"")),
            headers=headers,
            content=_request_body(receive, body_read) if has_body else None,
            timeout=self._timeout,
        )
        error: UpstreamStreamError | None = None
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(_cancel_on_disconnect, receive, body_read, task_group.cancel_scope)
            try:
                await self._exchange(request, send, method, path)
            except UpstreamStreamError as exc:
                error = exc  # raised below: from inside the task group it would arrive wrapped in a group
            except (_ClientGone, OSError):
                logger.debug("client went away during %s %s", method, path)
            task_group.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _exchange(self, request: httpx.Request, send: Send, method: str, path: str) -> None:
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            logger.warning("upstream timed out for %s %s: %s", method, path, type(exc).__name__)
            await _send_upstream_error(send, 504, "The upstream model server timed out.", "upstream_timeout", path)
            return
        except httpx.TransportError as exc:
            logger.warning("upstream unreachable for %s %s: %s", method, path, type(exc).__name__)
            message = "The upstream model server could not be reached."
            await _send_upstream_error(send, 502, message, "upstream_unreachable", path)
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": client_response_headers(response.headers.raw),
                }
            )
            await _relay_body(response, send)
        finally:
            # Shielded: when the task is cancelled (the guard aborted, the client left), closing
            # the connection is what tells the upstream model to stop generating.
            with anyio.move_on_after(_CLOSE_TIMEOUT_SECONDS, shield=True):
                await response.aclose()


async def _relay_body(response: httpx.Response, send: Send) -> None:
    chunks = cast(AsyncGenerator[bytes, None], response.aiter_raw())
    try:
        async for chunk in chunks:
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except httpx.TransportError as exc:
        raise UpstreamStreamError(f"the upstream connection failed mid-response: {type(exc).__name__}") from exc
    finally:
        with anyio.move_on_after(_CLOSE_TIMEOUT_SECONDS, shield=True):
            await chunks.aclose()
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _has_body(scope: Scope, headers: list[tuple[bytes, bytes]]) -> bool:
    # HTTP/1.1 framing: a request has a body only with Content-Length or Transfer-Encoding
    # (RFC 9112 §6.3); the ASGI server has already de-chunked it. HTTP/2 and 3 frame bodies
    # without either header, so there only the method tells.
    length = dict(headers).get(b"content-length")
    if length is not None:
        return length.strip() != b"0"
    if any(name.lower() == b"transfer-encoding" for name, _ in scope["headers"]):
        return True
    return scope.get("http_version", "1.1") not in ("1.0", "1.1") and scope["method"] not in _BODYLESS_METHODS


async def _request_body(receive: Receive, body_read: anyio.Event) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        body: bytes = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            break
    body_read.set()


async def _cancel_on_disconnect(receive: Receive, body_read: anyio.Event, scope: anyio.CancelScope) -> None:
    # `send` does not fail once the client has gone (uvicorn drops the message), so the only
    # reliable signal is `http.disconnect`; it can be awaited only once the body is consumed.
    await body_read.wait()
    message: Message = {"type": "http.request"}
    while message["type"] != "http.disconnect":
        message = await receive()
    scope.cancel()


async def _send_upstream_error(send: Send, status: int, message: str, code: str, path: str = "") -> None:
    """An error in the envelope of the dialect the path names (OpenAI's by default)."""
    name = dialect_for_path(path)
    with contextlib.suppress(OSError):  # the client may already be gone; nothing left to tell it
        if name is None:
            await send_json(send, status, openai_error(message, type="upstream_error", code=code))
        else:
            await send_response(send, status, get_dialect(name).error_body(status, code, message), b"application/json")
