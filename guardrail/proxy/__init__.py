"""The standalone guarding proxy (``guardrail serve``) and the apps it is made of.

`build_app` (or the uvicorn factory `create_app`) builds `GuardingProxy`: routes, metrics and
health around a `ReloadingGuard`, which guards the model app with the current rules.
`UpstreamProxy` forwards to an OpenAI-compatible upstream; `DemoModel` answers by itself when
there is none. Neither of those two guards anything: `GuardrailMiddleware` wraps whichever is served.
"""

from __future__ import annotations

from guardrail.exceptions import UpstreamStreamError
from guardrail.proxy.app import GuardingProxy, ServeSettings, build_app, create_app
from guardrail.proxy.demo import DemoModel
from guardrail.proxy.reload import ReloadingGuard
from guardrail.proxy.upstream import UpstreamProxy

__all__ = [
    "DemoModel",
    "GuardingProxy",
    "ReloadingGuard",
    "ServeSettings",
    "UpstreamProxy",
    "UpstreamStreamError",
    "build_app",
    "create_app",
]
