"""The standalone guarding proxy's apps: the plain forwarding app and the built-in demo model.

`UpstreamProxy` forwards to an OpenAI-compatible upstream; `DemoModel` answers by itself when
there is none. Neither guards anything: `GuardrailMiddleware` wraps whichever is served.
"""

from __future__ import annotations

from guardrail.exceptions import UpstreamStreamError
from guardrail.proxy.demo import DemoModel
from guardrail.proxy.upstream import UpstreamProxy

__all__ = ["DemoModel", "UpstreamProxy", "UpstreamStreamError"]
