"""Small concurrency pieces for the request path, cheaper than the general ones where it counts."""

from __future__ import annotations

import time
from collections import deque
from types import TracebackType

import anyio


class RequestClock:
    """``anyio.current_time()``, read once; after that, the monotonic clock from that point.

    ``anyio.current_time()`` looks up the running async library on every call, which shows in
    a profile of the per-delta path. Both clocks are monotonic, so an offset taken once gives
    times that ``anyio.sleep_until`` understands.
    """

    __slots__ = ("_offset",)

    def __init__(self) -> None:
        self._offset = anyio.current_time() - time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() + self._offset


class SendLock:
    """A lock for one request's sends, free of any checkpoint when nobody holds it.

    The app's sends and the deadline watcher's take turns through it. Uncontended (nearly every
    delta), acquiring costs a flag check; a waiter is handed the lock in order, and a waiter
    cancelled while queued gives its turn to the next.
    """

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[anyio.Event] = deque()

    async def __aenter__(self) -> None:
        if not self._held:
            self._held = True
            return
        turn = anyio.Event()
        self._waiters.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():
                self._release()  # handed the lock as it was cancelled: pass it on
            else:
                self._waiters.remove(turn)
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._release()

    def _release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # the lock stays held, by the next in line
        else:
            self._held = False
