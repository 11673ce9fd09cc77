"""What OpenAI's two streaming APIs (chat completions, Responses) share: the error envelope,
usage options, and the strings of an SSE block outside its data."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from guardrail.core import jsontext
from guardrail.core.dialects._events import content_texts as texts, sse_others

__all__ = ["error", "error_body", "include_usage", "sse_others", "status_error_body", "texts"]

# Per-message overhead of the chat format, as in OpenAI's cookbook ("How to count tokens with
# tiktoken"): every message is wrapped in 3 tokens, a name adds 1, every reply is primed with 3.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_REPLY_PRIMING = 3


def error(message: str, type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope: the SDKs raise their typed errors from it."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_body(code: str, message: str, param: str | None = None, type: str = "invalid_request_error") -> bytes:
    return jsontext.dumps(error(message, type, code, param)).encode()


def status_error_body(status: int, code: str, message: str, param: str | None = None) -> bytes:
    """A whole error response's body: an upstream's failure (5xx) or the request's (4xx)."""
    return error_body(code, message, param, "upstream_error" if status >= 500 else "invalid_request_error")


def include_usage(payload: Mapping[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def chat_prompt_tokens(payload: Mapping[str, Any], count: Callable[[str], int]) -> int:
    """Tokens of a chat request's messages: their text plus the per-message overhead.

    Counted: each message's ``role``, ``name`` and text (a string ``content``, or the ``text`` of
    its parts), plus :data:`TOKENS_PER_MESSAGE` per message, :data:`TOKENS_PER_NAME` per name and
    :data:`TOKENS_REPLY_PRIMING` once. Not counted: images, audio, tool definitions and tool-call
    arguments, which providers price their own ways.
    """
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return 0
    total = TOKENS_REPLY_PRIMING
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += TOKENS_PER_MESSAGE
        for key in ("role", "name"):
            value = message.get(key)
            if isinstance(value, str):
                total += count(value) + (TOKENS_PER_NAME if key == "name" else 0)
        content = message.get("content")
        if isinstance(content, list):  # only text parts: images and audio are priced their own ways
            content = [part for part in content if isinstance(part, dict) and part.get("type") == "text"]
        total += sum(count(text) for text in texts(content))
    return total
