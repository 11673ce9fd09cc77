"""Built-in rules, and the protocol plugins implement.

A plugin is any class whose instances have a ``checker()`` method returning an object with
``feed(text) -> Verdict`` and ``finish() -> Verdict`` (see :mod:`guardrail.core.rule`).
"""

from __future__ import annotations

from guardrail.core.rule import Action, Checker, Hit, Rule, Verdict
from guardrail.rules.banned import BannedPatterns

__all__ = ["Action", "BannedPatterns", "Checker", "Hit", "Rule", "Verdict"]
