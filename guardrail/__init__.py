"""guardrail: guard streaming LLM answers while they are in flight.

from guardrail import GuardrailMiddleware
app.add_middleware(GuardrailMiddleware, rules="rules/default.yaml")
"""

from __future__ import annotations

from guardrail.asgi.middleware import GuardrailMiddleware
from guardrail.config import RuleSet, load_rules
from guardrail.core.engine import StreamGuard
from guardrail.core.outputs import Anomaly, AnomalyKind, Ended, Intervention, Outcome, Output, Released, Send
from guardrail.core.rule import Action, BoundRule, Checker, Fallback, Hit, Rule, Verdict
from guardrail.exceptions import (
    ConfigError,
    ConfigProblem,
    EncodingError,
    GuardrailError,
    PluginError,
    RuleError,
    SSEError,
    StreamError,
    UpstreamStreamError,
)
from guardrail.rules.banned import BannedPatterns

__all__ = [
    "Action",
    "Anomaly",
    "AnomalyKind",
    "BannedPatterns",
    "BoundRule",
    "Checker",
    "ConfigError",
    "ConfigProblem",
    "EncodingError",
    "Ended",
    "Fallback",
    "GuardrailError",
    "GuardrailMiddleware",
    "Hit",
    "Intervention",
    "Outcome",
    "Output",
    "PluginError",
    "Released",
    "Rule",
    "RuleError",
    "RuleSet",
    "SSEError",
    "Send",
    "StreamError",
    "StreamGuard",
    "UpstreamStreamError",
    "Verdict",
    "load_rules",
]
