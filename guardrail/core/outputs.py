"""What :class:`~guardrail.core.engine.StreamGuard` hands back to its shell.

Every output is a frozen value; shells match on the type. Don't subclass these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from guardrail.core.rule import Action, Fallback


class Outcome(enum.StrEnum):
    """How a stream ended, as counted in ``guardrail_streams_total``."""

    COMPLETED = "completed"
    ABORTED = "aborted"
    FALLBACK = "fallback"
    TIMEOUT = "timeout"
    CLIENT_DISCONNECTED = "client_disconnected"
    UPSTREAM_ERROR = "upstream_error"


class AnomalyKind(enum.StrEnum):
    """Bad input the guard saw, and dealt with (see :class:`Anomaly`)."""

    MALFORMED_EVENT = "malformed_event"
    OVERSIZED_EVENT = "oversized_event"
    UNKNOWN_EVENT = "unknown_event"
    UNTERMINATED_EVENT = "unterminated_event"
    RULE_ERROR = "rule_error"
    UNREADABLE_RESPONSE = "unreadable_response"  # an answer the guard could not read: refused
    TRUNCATED_STREAM = "truncated_stream"  # the body ended before the dialect's end: ended with an error


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes for the client, in order."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Intervention:
    """A rule fired on ``channel`` over ``text[start:end]``.

    ``leaked`` counts the characters of the span that had already reached the client when the
    rule fired: always 0 for rules with hold-back, possibly more for ``holdback: false``.
    """

    rule: str
    action: Action
    channel: str
    start: int
    end: int
    leaked: int = 0
    detail: str = ""


class Released(NamedTuple):
    """``chars`` characters that had been held back were released; the oldest arrived at ``held_since``.

    (A named tuple: a stream whose every word may begin a match hands one back for every delta.)
    """

    chars: int
    held_since: float


@dataclass(frozen=True, slots=True)
class Anomaly:
    """Bad input: what it was, and whether the guard passed it through or ended the stream for it.

    ``rule`` names the rule that failed, for a ``rule_error``.
    """

    kind: AnomalyKind
    detail: str
    ended_stream: bool
    rule: str | None = None


@dataclass(frozen=True, slots=True)
class Ended:
    """The guard ended the stream: the shell sends what came before, closes the body, and stops the app.

    ``fallback`` is set when the stream must go on with a fallback answer from another upstream
    (a fallback with ``url``); fixed-text fallbacks are already rendered into the preceding
    :class:`Send`.
    """

    outcome: Outcome
    rule: str | None = None
    fallback: Fallback | None = None


Output = Send | Intervention | Released | Anomaly | Ended
