"""The ``idle_timeout`` rule: a stream that goes quiet, or is slow to start or to finish.

Only deltas that carry text reset the idle clock: SSE comments, keep-alives and empty deltas
keep a connection open but say nothing, and a stalled model can hide behind them for as long
as the connection lasts.
"""

from __future__ import annotations

from dataclasses import dataclass

from mypy_extensions import mypyc_attr

IDLE = "idle_timeout"
FIRST_TOKEN = "first_token_timeout"
TOTAL = "total_timeout"


@dataclass(frozen=True, slots=True)
@mypyc_attr(allow_interpreted_subclasses=True)
class IdleTimeout:
    """Limits on a stream's silences and length, in seconds.

    Args:
        seconds: the longest gap allowed between deltas that carry text. Before the first
            delta, the gap counts from the start of the request unless ``first_token_seconds``
            is given.
        first_token_seconds: how long the first delta with text may take.
        total_seconds: how long the whole stream may take.

    Raises:
        ValueError: a limit is not a positive number.
    """

    seconds: float
    first_token_seconds: float | None = None
    total_seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("seconds", "first_token_seconds", "total_seconds"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")

    def timer(self, start: float) -> IdleTimer:
        """A fresh timer for a stream that started at ``start``."""
        return IdleTimer(self, start)


class IdleTimer:
    """One stream's clocks. Each limit fires at most once (the idle one once per silence)."""

    __slots__ = ("_first_due", "_idle_due", "_limits", "_total_due")

    def __init__(self, limits: IdleTimeout, start: float) -> None:
        self._limits = limits
        first = limits.first_token_seconds
        self._first_due: float | None = start + first if first is not None else None
        self._idle_due: float | None = start + limits.seconds if first is None else None
        self._total_due = start + limits.total_seconds if limits.total_seconds is not None else None

    def content(self, now: float) -> None:
        """Text arrived: the first-token limit is met and the idle clock starts again."""
        self._first_due = None
        self._idle_due = now + self._limits.seconds

    def deadline(self) -> float | None:
        """The earliest limit still armed."""
        earliest = self._first_due
        for due in (self._idle_due, self._total_due):
            if due is not None and (earliest is None or due < earliest):
                earliest = due
        return earliest

    def expired(self, now: float) -> str | None:
        """The code of the first limit passed by ``now``; it is disarmed so it fires once."""
        if self._first_due is not None and now >= self._first_due:
            self._first_due = None
            return FIRST_TOKEN
        if self._total_due is not None and now >= self._total_due:
            self._total_due = self._idle_due = None
            return TOTAL
        if self._idle_due is not None and now >= self._idle_due:
            self._idle_due = None
            return IDLE
        return None
