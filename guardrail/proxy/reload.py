"""Hot reload of rule files for ``guardrail serve``, without dropping streams in flight.

:class:`GuardrailMiddleware` is immutable, so a reload never changes a middleware: it builds a
new one for the new rules and swaps which one :class:`ReloadingGuard` dispatches new requests to.
A stream in flight holds the rules its middleware gave it when it started and finishes with
them. Every generation counts into the same :class:`~guardrail.metrics.GuardMetrics`, which
declares the new rules' series as it is built.

Rule files are reloaded when they change (their modification time, size or inode, polled about
once a second; no dependency, and it works on every file system) or when the process receives
``SIGHUP`` (where the platform has it, in the main thread). A new version with any problem is
refused: every located problem is logged, and the rules in force stay.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence

import anyio
import anyio.abc

from guardrail._types import ASGIApp, Receive, Scope, Send
from guardrail.asgi.middleware import GuardrailMiddleware
from guardrail.config import RuleSet, load_rules
from guardrail.exceptions import ConfigError
from guardrail.metrics import GuardMetrics

logger = logging.getLogger(__name__)

# Often enough that an edit shows within a second or two; a stat per file costs microseconds.
DEFAULT_POLL_SECONDS = 1.0

# A changed file is read only once it has not changed for this long (an editor or a deploy may
# still be writing it), and read twice: both reads must agree, or the reload waits.
SETTLE_SECONDS = 0.5

_Signature = tuple[tuple[int, int, int] | None, ...]


def _signature(paths: Sequence[str]) -> _Signature:
    """What tells a file changed: mtime, size and inode (an editor that saves by rename changes the inode)."""
    stamps: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(stamps)


def _contents(paths: Sequence[str]) -> tuple[bytes | None, ...]:
    contents: list[bytes | None] = []
    for path in paths:
        try:
            with open(path, "rb") as file:
                contents.append(file.read())
        except OSError:
            contents.append(None)
    return tuple(contents)


class ReloadingGuard:
    """An ASGI app guarding ``app`` with the current rules of ``paths``, reloaded when they change.

    Run :meth:`watch` in a task (``guardrail serve`` does, in its lifespan) to reload on change
    and on ``SIGHUP``; or call :meth:`reload` yourself.

    Attributes:
        generation: how many times new rules have been put in force (0 for the first ones).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        paths: Sequence[str],
        metrics: GuardMetrics,
        rules: RuleSet | None = None,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
    ) -> None:
        """Load the rules and build the first middleware.

        Args:
            app: the app to guard (the proxy or the demo model); shared by every generation.
            paths: the rule files.
            metrics: where every generation counts.
            rules: the rules of ``paths`` if already loaded (they are loaded otherwise).
            poll_seconds: how often :meth:`watch` looks at the files' modification times.

        Raises:
            ConfigError: a rule file is invalid (at start there are no old rules to keep).
            ValueError: ``poll_seconds`` is not positive.
        """
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be positive, got {poll_seconds}")
        self.app = app
        self.paths = tuple(paths)
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self.generation = 0
        self._signature = _signature(self.paths)
        self._current = self._build(rules if rules is not None else load_rules(self.paths))

    @property
    def rules(self) -> RuleSet:
        """The rules in force for new requests."""
        return self._current.rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Read once: the request stays with this generation even if a reload happens meanwhile.
        await self._current(scope, receive, send)

    async def reload(self, reason: str = "requested") -> bool:
        """Load the rule files again and put them in force for new requests, if they are valid.

        Args:
            reason: why, for the log (``"changed"``, ``"SIGHUP"``).

        Returns:
            True if the new rules are in force; False if they were refused (the problems are
            logged at ERROR, and the old rules stay).
        """
        before = await anyio.to_thread.run_sync(_contents, self.paths)
        try:
            # In a thread: reading YAML, compiling regexes and importing plugins would stall streams.
            rules = await anyio.to_thread.run_sync(load_rules, self.paths)
        except ConfigError as exc:
            if await anyio.to_thread.run_sync(_contents, self.paths) != before:
                logger.info("rule files changed while being read (%s); reloading once they settle", reason)
                return False
            self._signature = _signature(self.paths)
            logger.error(
                "rule reload (%s) refused, the previous rules stay in force; %d problem(s):", reason, len(exc.problems)
            )
            for problem in exc.problems:
                logger.error("  %s", problem)
            return False
        if await anyio.to_thread.run_sync(_contents, self.paths) != before:
            # Read while still being written: a file cut at a rule boundary parses, and guards less.
            logger.info("rule files changed while being read (%s); reloading once they settle", reason)
            return False
        self._signature = _signature(self.paths)
        self._current = self._build(rules)
        self.generation += 1
        logger.info(
            "rules reloaded (%s): %d rule(s) from %s now guard new requests",
            reason,
            len(rules.rules),
            ", ".join(self.paths),
        )
        return True

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reload when a rule file changes or on ``SIGHUP``, until cancelled."""
        async with anyio.create_task_group() as tasks:
            if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
                await tasks.start(self._reload_on_sighup)
            task_status.started()
            while True:
                await anyio.sleep(self.poll_seconds)
                seen = _signature(self.paths)
                if seen == self._signature:
                    continue
                # Wait until the files stop changing: a deploy or an editor may be writing them.
                while True:
                    await anyio.sleep(SETTLE_SECONDS)
                    now = _signature(self.paths)
                    if now == seen:
                        break
                    seen = now
                await self.reload("changed")

    async def _reload_on_sighup(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()
            async for _ in signals:
                await self.reload("SIGHUP")

    def _build(self, rules: RuleSet) -> GuardrailMiddleware:
        return GuardrailMiddleware(self.app, rules=rules, metrics=self.metrics)
