"""The compiled, immutable result of loading rule files: what the middleware consumes."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from guardrail.core.dialect import Kind
from guardrail.core.rule import Action, BoundRule

DEFAULT_TOKENIZER = "o200k_base"


def _compile_globs(globs: Sequence[str]) -> re.Pattern[str] | None:
    if not globs:
        return None
    # fnmatch.translate gives '*' the freedom to cross '/', so "/v1/*" covers "/v1/chat/completions".
    return re.compile("|".join(f"(?:{fnmatch.translate(glob)})" for glob in globs))


_NOTHING_HIDDEN: frozenset[Kind] = frozenset()  # shared by every stream that hides nothing


@dataclass(frozen=True, slots=True)
class RuleGroup:
    """The rules of one rule file, and the request paths they guard.

    Attributes:
        source: the file the rules came from, as given.
        paths: path globs (fnmatch, case-sensitive, ``*`` also crosses ``/``); ``()`` is every path.
        tokenizer: the tiktoken encoding or model name the file's token rules count with.
        rules: the file's rules, in file order.
        dialects: path globs and the dialect their answers are read in, where the path does not say.
        pass_unreadable: path globs whose answers the guard cannot read pass unguarded.
        final_answer_only: where only the final answer streams (path globs, empty: the group's
            paths) and whether tool calls are held back too; None: everything streams.
    """

    source: str
    paths: tuple[str, ...]
    tokenizer: str
    rules: tuple[BoundRule, ...]
    dialects: tuple[tuple[str, str], ...] = ()  # (path glob, dialect name)
    pass_unreadable: tuple[str, ...] = ()  # path globs whose unreadable answers pass
    final_answer_only: tuple[tuple[str, ...], bool] | None = None  # (path globs, tool calls too)
    _matcher: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_matcher", _compile_globs(self.paths))

    def matches(self, path: str) -> bool:
        """Whether this group guards the request path ``path`` (``scope["path"]``, no query string)."""
        return self._matcher is None or self._matcher.match(path) is not None


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Every loaded rule, grouped by the file it came from. Immutable; share it freely."""

    groups: tuple[RuleGroup, ...]

    def rules_for(self, path: str) -> tuple[BoundRule, ...]:
        """The rules guarding the request path ``path``: those of every group whose paths match it."""
        matching = [group for group in self.groups if group.matches(path)]
        if len(matching) == 1:
            return matching[0].rules  # the group's own tuple, shared by every stream on its paths
        return tuple(rule for group in matching for rule in group.rules)

    def dialect_for(self, path: str) -> str | None:
        """The dialect a rule file names for ``path``, if one does."""
        for group in self.groups:
            for glob, name in group.dialects:
                if fnmatch.fnmatchcase(path, glob):
                    return name
        return None

    def hidden_on(self, path: str) -> frozenset[Kind]:
        """The kinds of channel checked but never sent on ``path`` (``final_answer_only``)."""
        hidden: set[Kind] = set()
        for group in self.groups:
            option = group.final_answer_only
            if option is None or not group.matches(path):
                continue
            globs, tool_calls = option
            if not globs or any(fnmatch.fnmatchcase(path, glob) for glob in globs):
                hidden.add(Kind.REASONING)
                if tool_calls:
                    hidden.add(Kind.TOOL)
        return frozenset(hidden) if hidden else _NOTHING_HIDDEN

    def passes_unreadable(self, path: str) -> bool:
        """Whether answers on ``path`` that the guard cannot read pass unguarded (else they are refused)."""
        return any(fnmatch.fnmatchcase(path, glob) for group in self.groups for glob in group.pass_unreadable)

    def tokenizer_for(self, path: str) -> str:
        """The tokenizer that counts tokens on ``path``: that of the first group matching it."""
        return next((group.tokenizer for group in self.groups if group.matches(path)), DEFAULT_TOKENIZER)

    @property
    def rules(self) -> tuple[BoundRule, ...]:
        """All rules of all groups."""
        return tuple(rule for group in self.groups for rule in group.rules)

    @classmethod
    def from_rules(
        cls, rules: Sequence[BoundRule], *, paths: Sequence[str] = (), tokenizer: str = DEFAULT_TOKENIZER
    ) -> RuleSet:
        """A rule set of one group, built in code rather than from a file (tests, embedding).

        Args:
            rules: the rules, in order.
            paths: path globs the rules guard; empty: every path.
            tokenizer: the tiktoken encoding or model name.

        Returns:
            The rule set.

        Raises:
            ValueError: two rules share a name, or a ``fallback`` rule has no fallback.
        """
        seen: set[str] = set()
        for rule in rules:
            if rule.name in seen:
                raise ValueError(f"duplicate rule name {rule.name!r}: rule names must be unique")
            seen.add(rule.name)
            if rule.action is Action.FALLBACK and rule.fallback is None:
                raise ValueError(f"rule {rule.name!r} has action 'fallback' but no fallback")
        return cls((RuleGroup("", tuple(paths), tokenizer, tuple(rules)),))
