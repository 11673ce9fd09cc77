"""Which headers a forwarding proxy passes on, in each direction (RFC 9110 §7.6.1).

Headers arrive as ASGI and httpx give them: ``(name, value)`` byte pairs. Everything here is
pure: no I/O, no logging, so the rules can be tested on their own.
"""

from __future__ import annotations

from collections.abc import Iterable

RawHeaders = list[tuple[bytes, bytes]]

# Hop-by-hop headers describe one connection, not the message: a proxy must not forward them
# (RFC 9110 §7.6.1). `proxy-*` is matched by prefix below, so Proxy-Authorization (the
# client's credentials *for this proxy*) never reaches the upstream.
HOP_BY_HOP_HEADERS: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_PROXY_PREFIX = b"proxy-"

# Set by httpx from the upstream URL and the body it actually sends.
_REQUEST_HEADERS_SET_BY_CLIENT: frozenset[bytes] = frozenset({b"host", b"accept-encoding"})

# The ASGI server has already answered any `Expect: 100-continue` from the client by the time
# the body reaches us; httpx does not implement the interim exchange, so forwarding it could
# make an upstream wait for a `100 Continue` nobody will read.
_REQUEST_HEADERS_ALREADY_HANDLED: frozenset[bytes] = frozenset({b"expect"})


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The header names a `Connection` header marks as hop-by-hop for this message.

    Args:
        headers: the message's headers; names in any case.

    Returns:
        The listed names, lowercased (`close` and `keep-alive` included as listed).
    """
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return frozenset(tokens)


def is_hop_by_hop(name: bytes, listed: frozenset[bytes] = frozenset()) -> bool:
    """Whether a header belongs to one connection only and must not be forwarded.

    Args:
        name: the header name, lowercased.
        listed: extra names the message's `Connection` header declared hop-by-hop.

    Returns:
        True for the RFC 9110 hop-by-hop headers, any `proxy-*` header and any listed name.
    """
    return name in HOP_BY_HOP_HEADERS or name.startswith(_PROXY_PREFIX) or name in listed


def end_to_end_headers(headers: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """The headers a proxy forwards: names lowercased, hop-by-hop headers removed.

    Args:
        headers: the headers as received.

    Returns:
        The end-to-end headers, in their original order, with lowercased names.
    """
    pairs = [(name.lower(), value) for name, value in headers]
    listed = connection_tokens(pairs)
    return [(name, value) for name, value in pairs if not is_hop_by_hop(name, listed)]


def upstream_request_headers(headers: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """The headers to send upstream for a client's request.

    End-to-end headers (`Authorization`, `Content-Type`, `Content-Length`, `OpenAI-*`...) are
    kept; hop-by-hop headers, `Host` and `Expect` are dropped, and `Accept-Encoding` is forced
    to `identity`.

    A kept `Content-Length` stays correct because the body is forwarded unchanged; without
    one, httpx sends the streamed body chunked.

    Args:
        headers: the request headers from the ASGI scope.

    Returns:
        The headers for the upstream request; httpx adds `Host` from the upstream URL.
    """
    kept = [
        (name, value)
        for name, value in end_to_end_headers(headers)
        if name not in _REQUEST_HEADERS_SET_BY_CLIENT and name not in _REQUEST_HEADERS_ALREADY_HANDLED
    ]
    # The guard must read the model's text as it streams. A gzip or brotli body is opaque to
    # it (and compresses poorly in small SSE chunks anyway), so ask the upstream for plain
    # bytes; the ASGI server may still compress towards the client.
    kept.append((b"accept-encoding", b"identity"))
    return kept


def client_response_headers(headers: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """The headers to send the client for an upstream response.

    `Content-Length` and `Content-Encoding` are kept: the body is passed on byte for byte. A
    middleware that changes the body drops `Content-Length` itself.

    Args:
        headers: the upstream response headers.

    Returns:
        The end-to-end headers, names lowercased as ASGI expects.
    """
    return end_to_end_headers(headers)
