"""The dialects the guard speaks, one module per provider's wire format."""

from __future__ import annotations

from typing import Any

from guardrail.core.dialect import DialectStream, Framing


def default_stream(**options: Any) -> DialectStream:
    """An OpenAI chat completion stream: what a :class:`~guardrail.core.engine.StreamGuard` guards by default."""
    from guardrail.core.dialects.openai_chat import ChatStream

    return ChatStream(Framing.SSE, **options)
