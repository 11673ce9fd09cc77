"""The ASGI shell around the core: :class:`GuardrailMiddleware`."""

from __future__ import annotations

from guardrail.asgi.middleware import GuardrailMiddleware

__all__ = ["GuardrailMiddleware"]
