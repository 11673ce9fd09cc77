"""What a rule is, as the engine sees it.

A :class:`Rule` is compiled once from a rule file and shared by every stream. For each stream
and each text channel (a choice's content, refusal or tool-call arguments) the engine asks it
for a fresh :class:`Checker`, feeds that checker the channel's text piece by piece, and reads a
:class:`Verdict` after every piece.

Offsets are character offsets (code points) into the channel's text, counted from the first
character the checker was fed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable


class Action(enum.StrEnum):
    """What the guard does when a rule fires."""

    ABORT = "abort"
    FALLBACK = "fallback"
    REDACT = "redact"
    LOG = "log"


@dataclass(frozen=True, slots=True)
class Hit:
    """A span of text a rule objects to: ``text[start:end]``, and what matched (a pattern, a phrase)."""

    start: int
    end: int
    detail: str = ""


class Verdict(NamedTuple):
    """A checker's answer after a piece of text (a named tuple: one is built per rule per delta).

    ``safe``: the rule will never object to text before this offset, apart from the ``hits`` it
    reports (now or earlier). It never moves backwards. Text from ``safe`` on is held back from
    the client while the rule has ``holdback`` on.
    ``hits``: new, final spans the rule objects to. A hit never starts before a ``safe`` offset
    reported earlier unless the rule runs with ``holdback: false``.
    """

    safe: int
    hits: tuple[Hit, ...] = ()


@runtime_checkable
class Checker(Protocol):
    """Per-stream, per-channel state of a rule."""

    def feed(self, text: str) -> Verdict:
        """Take the channel's next piece of text; return the verdict on everything fed so far."""
        ...

    def finish(self) -> Verdict:
        """The channel's text is complete: resolve anything pending. ``safe`` must reach the end."""
        ...


@runtime_checkable
class Rule(Protocol):
    """A compiled rule, shared by all streams. Plugins implement this (see README, "Plugins")."""

    def checker(self) -> Checker:
        """A fresh checker for one channel of one stream."""
        ...


@runtime_checkable
class Timer(Protocol):
    """Per-stream clock of a time-based rule. Times are seconds on the shell's monotonic clock."""

    def content(self, now: float) -> None:
        """A delta with text arrived (comments, keep-alives and empty deltas don't count)."""
        ...

    def deadline(self) -> float | None:
        """When :meth:`expired` should next be asked, or None while nothing can expire."""
        ...

    def expired(self, now: float) -> str | None:
        """The code of a limit that has passed by ``now`` (e.g. ``"idle_timeout"``), once; else None."""
        ...


@runtime_checkable
class TimedRule(Protocol):
    """A rule that watches time rather than text (see :class:`Timer`)."""

    def timer(self, start: float) -> Timer:
        """A fresh timer for one stream that started at ``start``."""
        ...


@dataclass(frozen=True, slots=True)
class Fallback:
    """A fallback answer from a rule file: fixed ``text``, or a branch to another upstream ``url``.

    ``separator`` goes between the text the client already received and a fixed ``text``
    (a blank line by default, so the answer does not read as glued to the cut one).
    """

    name: str
    text: str | None = None
    url: str | None = None
    model: str | None = None
    separator: str = "\n\n"


@dataclass(frozen=True, slots=True)
class BoundRule:
    """A rule bound to what the rule file says about it: its name, action and options."""

    name: str
    rule: Rule | TimedRule
    action: Action
    holdback: bool = True
    replacement: str = "[redacted]"
    fallback: Fallback | None = None
    source: str = field(default="", compare=False)
    checks_text: bool = field(default=False, init=False, repr=False, compare=False)  # ``rule`` is a Rule
    watches_time: bool = field(default=False, init=False, repr=False, compare=False)  # ``rule`` is a TimedRule

    def __post_init__(self) -> None:
        # Asked once here rather than by every stream: a runtime protocol check costs microseconds.
        object.__setattr__(self, "checks_text", isinstance(self.rule, Rule))
        object.__setattr__(self, "watches_time", isinstance(self.rule, TimedRule))
