"""Branching to a fallback upstream: the HTTP half of a fallback with ``url``.

When a rule whose fallback has a ``url`` fires, the middleware stops the app and re-sends the
original request to that URL (with the answer's endpoint joined on, when it is a base URL:
see :mod:`guardrail.config.urls`), then streams the answer into the same response (see
``_GuardedResponse._branch`` in :mod:`guardrail.asgi.middleware`). This module builds that
request and opens it.

The request
-----------
The body is the client's original request body (kept by the middleware up to
:data:`~guardrail.asgi.request.MAX_REQUEST_BYTES`), with ``stream`` set to true and ``model``
replaced when the fallback names one. Without a kept JSON body there is nothing to re-send, and
the middleware ends the stream as an abort would.

Credentials
-----------
The client's credential headers (:data:`CREDENTIAL_HEADERS`: ``Authorization``, ``api-key``,
``x-api-key``, ``Cookie``, ``OpenAI-Organization``, ``OpenAI-Project``) go to the fallback only
when its URL has the same origin (scheme, host and port) as a place the client's credentials
were going anyway: the origin the client addressed (its ``Host``), or an origin listed in the
scope under :data:`CREDENTIAL_ORIGINS_KEY` (``guardrail serve`` lists its ``--upstream`` there).
A fallback on any other host gets the request without them, so a key meant for one provider
never reaches another. Other end-to-end headers are forwarded; hop-by-hop ones never are.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import anyio
import httpx

from guardrail._types import Scope
from guardrail.asgi.request import ChatRequest
from guardrail.config.urls import fallback_endpoint
from guardrail.core.rule import Fallback

logger = logging.getLogger(__name__)

# Scope key: origins (``scheme://host:port``) that may receive the client's credentials.
CREDENTIAL_ORIGINS_KEY = "guardrail.credential_origins"

CREDENTIAL_HEADERS: frozenset[bytes] = frozenset(
    {b"authorization", b"api-key", b"x-api-key", b"cookie", b"openai-organization", b"openai-project"}
)

# The fallback is a model server like the first: a long first byte is normal, so reads get the
# openai SDK's default patience; a stall inside its stream is the idle-timeout rules' business.
FALLBACK_TIMEOUT = httpx.Timeout(600.0, connect=10.0)

# Bounds the shielded closing of the fallback's response, which must not hang a cancelled task.
_CLOSE_TIMEOUT_SECONDS = 5.0

_DEFAULT_PORTS = {"http": 80, "https": 443}


class FallbackUnavailable(Exception):
    """The fallback upstream did not start a stream: unreachable, timed out, or not a 200 event stream."""


@dataclass(frozen=True, slots=True)
class FallbackRequest:
    """What to send to the fallback upstream."""

    url: str
    body: bytes
    headers: list[tuple[bytes, bytes]]


def origin_of(url: str | httpx.URL) -> str | None:
    """The origin of an absolute http(s) URL, as ``scheme://host:port``; None for anything else.

    Args:
        url: the URL.

    Returns:
        The origin, lowercased, with the scheme's default port written out.
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return None
    if parsed.scheme not in _DEFAULT_PORTS or not parsed.host:
        return None
    port = parsed.port or _DEFAULT_PORTS[parsed.scheme]
    return f"{parsed.scheme}://{parsed.host.lower()}:{port}"


def display_url(url: str | httpx.URL) -> str:
    """A URL safe to log: without user info, query string or fragment, which may hold credentials.

    Args:
        url: the URL.

    Returns:
        ``scheme://host[:port]/path``, or ``"<invalid URL>"``.
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid URL>"
    return str(parsed.copy_with(username=None, password=None, query=None, fragment=None))


def fallback_request(
    request: ChatRequest, fallback: Fallback, scope: Scope, dialect: str = "openai_chat"
) -> FallbackRequest | None:
    """The request to send to a url fallback, or None when the original body was not kept.

    Args:
        request: the client's request as the middleware kept it.
        fallback: the fallback that fired; its ``url`` must be set.
        scope: the request's ASGI scope, for its headers and credential origins.
        dialect: the dialect of the answer the fallback continues: a ``url`` in the base form
            (``http://host/v1``) is called at that dialect's endpoint (see
            :func:`~guardrail.config.urls.fallback_endpoint`).

    Returns:
        The URL, body and headers to send; None if there is no JSON object body to re-send.
    """
    # Imported here: guardrail.proxy wraps this middleware, so a module-level import would be circular.
    from guardrail.proxy.headers import upstream_request_headers

    assert fallback.url is not None
    if request.body is None or request.payload is None:
        return None
    payload = dict(request.payload)
    payload["stream"] = True
    if fallback.model is not None:
        payload["model"] = fallback.model
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    headers = [
        (name, value)
        for name, value in upstream_request_headers(scope.get("headers", []))
        if name != b"content-length"  # the body changed; httpx sets the new length
    ]
    url = fallback_endpoint(fallback.url, dialect)
    if not _may_receive_credentials(url, scope):
        headers = [(name, value) for name, value in headers if name not in CREDENTIAL_HEADERS]
    return FallbackRequest(url, body, headers)


def _may_receive_credentials(url: str, scope: Scope) -> bool:
    target = origin_of(url)
    if target is None:
        return False
    trusted: set[str] = set()
    host = next((value for name, value in scope.get("headers", []) if name.lower() == b"host"), None)
    if host:
        addressed = origin_of(f"{scope.get('scheme', 'http')}://{host.decode('latin-1')}")
        if addressed is not None:
            trusted.add(addressed)
    declared: Iterable[str] = scope.get(CREDENTIAL_ORIGINS_KEY, ())
    trusted.update(origin for origin in map(origin_of, declared) if origin is not None)
    return target in trusted


@contextlib.asynccontextmanager
async def open_fallback(request: FallbackRequest) -> AsyncIterator[httpx.Response]:
    """Send ``request`` and yield the streaming response once it is known to be a 200 event stream.

    A client is made per branch: branches are rare, and this way nothing outlives the request.

    Args:
        request: what :func:`fallback_request` built.

    Yields:
        The response, its body not read yet; it is closed when the block exits.

    Raises:
        FallbackUnavailable: the upstream could not be reached, timed out, or answered with
            something other than a 200 ``text/event-stream``.
    """
    where = display_url(request.url)
    client = httpx.AsyncClient(timeout=FALLBACK_TIMEOUT)
    try:
        try:
            response = await client.send(
                client.build_request("POST", request.url, content=request.body, headers=request.headers),
                stream=True,
            )
        except httpx.HTTPError as exc:
            raise FallbackUnavailable(f"the fallback upstream {where} failed: {type(exc).__name__}") from exc
        try:
            content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if response.status_code != 200 or content_type != "text/event-stream":
                raise FallbackUnavailable(
                    f"the fallback upstream {where} answered {response.status_code} {content_type or '(no type)'}"
                )
            yield response
        finally:
            # Shielded: when the client leaves, closing is what tells the fallback model to stop.
            with anyio.move_on_after(_CLOSE_TIMEOUT_SECONDS, shield=True):
                await response.aclose()
    finally:
        with anyio.move_on_after(_CLOSE_TIMEOUT_SECONDS, shield=True):
            await client.aclose()
