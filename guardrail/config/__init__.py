"""Rule files: YAML in, an immutable, compiled :class:`RuleSet` out.

``load_rules("rules/default.yaml")`` reads, validates and compiles rule files (schema version 1,
see :mod:`guardrail.config.schema`) and raises :class:`~guardrail.exceptions.ConfigError` listing
every problem of every file, each as ``file:line: key.path: message``. ``check_files`` returns
the same problems without raising (``guardrail check``).
"""

from __future__ import annotations

from guardrail.config.loader import check_files, load_rules
from guardrail.config.ruleset import RuleGroup, RuleSet

__all__ = ["RuleGroup", "RuleSet", "check_files", "load_rules"]
