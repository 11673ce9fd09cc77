"""The dialects the guard speaks, one module per provider's wire format, and how one is chosen.

:data:`ENDPOINTS` maps the end of a request path to the dialect that answers it; the rule file
can name a dialect for a path pattern instead (``dialects:``). Modules are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from guardrail.core.dialect import Dialect, DialectStream, Framing, RequestInfo

# name: module (each defines DIALECT)
DIALECTS = {
    "openai_chat": "guardrail.core.dialects.openai_chat",
    "openai_responses": "guardrail.core.dialects.openai_responses",
    "anthropic_messages": "guardrail.core.dialects.anthropic",
    "openai_completions": "guardrail.core.dialects.openai_completions",
    "ollama": "guardrail.core.dialects.ollama",
    "gemini": "guardrail.core.dialects.gemini",
    "vercel_ui": "guardrail.core.dialects.vercel_ui",
    "text": "guardrail.core.dialects.plain_text",
}

# The end of a request path (as the API spells it: matched in any case), and the dialect that answers there.
ENDPOINTS: tuple[tuple[str, str], ...] = (
    ("/chat/completions", "openai_chat"),
    ("/completions", "openai_completions"),
    ("/responses", "openai_responses"),
    ("/messages", "anthropic_messages"),
    ("/api/chat", "ollama"),
    ("/api/generate", "ollama"),
    (":streamGenerateContent", "gemini"),
    (":generateContent", "gemini"),
)
_ENDINGS = tuple((suffix.lower(), suffix, name) for suffix, name in ENDPOINTS)


def get_dialect(name: str) -> Dialect:
    """The dialect called ``name``; raises KeyError for an unknown name."""
    module = importlib.import_module(DIALECTS[name])
    dialect: Dialect = module.DIALECT
    return dialect


def dialect_for_path(path: str) -> str | None:
    """The dialect of the endpoint ``path`` names (resolved; in any case), or None."""
    lowered = path.lower().rstrip("/")
    for suffix, _, name in _ENDINGS:
        if lowered.endswith(suffix):
            return name
    return None


def endpoint_path(path: str) -> str:
    """``path`` lowercased, its endpoint's ending spelled as the API spells it (``:generateContent``)."""
    lowered = path.lower()
    for suffix, spelled, _ in _ENDINGS:
        if lowered.endswith(suffix):
            return lowered[: -len(suffix)] + spelled
    return lowered


def start_stream(
    name: str | None, framing: Framing, request: RequestInfo | None = None, **options: Any
) -> DialectStream:
    """A stream object for one response in the dialect ``name``; None: the dialect its first event tells."""
    if name is None:
        from guardrail.core.dialects.detect import DetectingStream

        return DetectingStream(framing, request, **options)
    return get_dialect(name).start(framing, request, **options)


def default_stream(**options: Any) -> DialectStream:
    """An OpenAI chat completion stream: what a :class:`~guardrail.core.engine.StreamGuard` guards by default."""
    from guardrail.core.dialects.openai_chat import ChatStream

    return ChatStream(Framing.SSE, **options)
