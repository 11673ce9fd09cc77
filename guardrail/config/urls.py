"""Base URLs and endpoint URLs: how ``--upstream`` and a fallback's ``url`` name a model server.

Both take the **base form** that OpenAI-compatible clients take as ``base_url``,
``http://host/v1``: the endpoint of each request is joined onto it (:func:`join_path`). A
fallback's ``url`` may also be in the **endpoint form**, ``http://host/v1/chat/completions``
(``/responses``, ``/messages``, ``/completions``), and is then called as it is.
:func:`url_problem` names the forms that cannot work, for ``guardrail check``.
"""

from __future__ import annotations

import httpx

# The endpoints a fallback can stream from, by dialect, as a client of the base URL calls them.
STREAMING_ENDPOINTS = {
    "openai_chat": "/v1/chat/completions",
    "openai_completions": "/v1/completions",
    "openai_responses": "/v1/responses",
    "anthropic_messages": "/v1/messages",
}
_ENDPOINT_ENDINGS = tuple(endpoint.removeprefix("/v1") for endpoint in STREAMING_ENDPOINTS.values())
# Paths a url may end with that name no endpoint a fallback can stream from, and what to say.
_WRONG_ENDINGS = (
    (("api", "chat"), "Ollama's native /api/chat answers in NDJSON, which a fallback cannot stream"),
    (("api", "generate"), "Ollama's native /api/generate answers in NDJSON, which a fallback cannot stream"),
    (("models",), "/models lists models and answers no prompt"),
    (("embeddings",), "/embeddings answers no prompt with text"),
    (("count_tokens",), "/count_tokens answers no prompt with text"),
    (("chat",), "/chat is not an endpoint (the chat endpoint is /chat/completions)"),
)
_FORMS = "give the base URL, as for --upstream (http://host/v1), or a chat endpoint (http://host/v1/chat/completions)"


def join_path(base_path: str, request_path: str) -> str:
    """Join a request path onto the upstream URL's path.

    The rule: segments the two paths share where the upstream path ends and the request path
    begins are written once. So the request path replaces the upstream path when the upstream
    path is a prefix of it, and is appended to it when they share nothing:

    ====================  ========================  ==============================
    upstream path         request path              result
    ====================  ========================  ==============================
    ``/v1``               ``/v1/chat/completions``  ``/v1/chat/completions``
    (empty)               ``/v1/chat/completions``  ``/v1/chat/completions``
    ``/api``              ``/v1/chat/completions``  ``/api/v1/chat/completions``
    ``/openai/v1``        ``/v1/chat/completions``  ``/openai/v1/chat/completions``
    ====================  ========================  ==============================

    The last row (a partial overlap) is what lets ``--upstream https://host/openai/v1`` work
    for clients configured with ``base_url=http://proxy/v1``. Segments are compared whole:
    ``/api`` does not overlap ``/api-docs``.

    Args:
        base_path: the upstream URL's path, percent-encoded.
        request_path: the client's request path, percent-encoded, starting with ``/``.

    Returns:
        The path to request upstream, starting with ``/``.
    """
    stripped = base_path.strip("/")
    base = stripped.split("/") if stripped else []
    request = request_path.removeprefix("/").split("/")
    overlap = next(
        (size for size in range(min(len(base), len(request)), 0, -1) if base[-size:] == request[:size]),
        0,
    )
    return "/" + "/".join(base + request[overlap:])


def fallback_endpoint(url: str, dialect: str) -> str:
    """The URL a fallback's ``url`` is called at for an answer in ``dialect``.

    Args:
        url: the fallback's ``url``, in the base form or the endpoint form (see the module docstring).
        dialect: the dialect of the answer being continued (``openai_chat``...).

    Returns:
        ``url`` itself in the endpoint form; in the base form, ``url`` with the dialect's endpoint
        joined on as :func:`join_path` joins a request path onto ``--upstream``
        (``http://host/v1`` and ``openai_chat`` give ``http://host/v1/chat/completions``).
    """
    parsed = httpx.URL(url)
    if parsed.path.rstrip("/").endswith(_ENDPOINT_ENDINGS):
        return url
    endpoint = STREAMING_ENDPOINTS.get(dialect, STREAMING_ENDPOINTS["openai_chat"])
    path = join_path(parsed.raw_path.split(b"?", 1)[0].decode("ascii"), endpoint)
    return str(parsed.copy_with(path=path))


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot work as a fallback's ``url``, or None when it can.

    Args:
        url: the ``url`` of a fallback in a rule file.

    Returns:
        What is wrong and what to write instead; None for an http(s) URL in the base or endpoint form.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        return f"{url!r} is not a valid URL ({exc})"
    if parsed.scheme not in ("http", "https"):
        return f"expected an http:// or https:// URL; found {url!r}"
    if not parsed.host:
        return f"expected an http:// or https:// URL with a host; found {url!r}"
    path = parsed.path.rstrip("/")
    segments = tuple(path.lower().strip("/").split("/"))
    for ending, why in _WRONG_ENDINGS:
        if segments[-len(ending) :] == ending:
            return f"{url!r} cannot work: {why}; {_FORMS}"
    for endpoint in _ENDPOINT_ENDINGS:
        if endpoint + "/" in path + "/" and not path.endswith(endpoint):
            return f"{url!r} cannot work: its path goes on after {endpoint}; {_FORMS}"
    return None
