"""Small concurrency pieces for the request path, cheaper than the general ones where it counts."""

from __future__ import annotations

import asyncio
from collections import deque
from time import monotonic
from types import TracebackType

import anyio


class RequestClock:
    """``anyio.current_time()``, read once; after that, the monotonic clock from that point.

    ``anyio.current_time()`` looks up the running async library on every call, which shows in
    a profile of the per-delta path. Both clocks are monotonic, so an offset taken once gives
    times on the event loop's clock (what ``loop.call_at`` takes). One clock serves every
    request on its event loop (``loop``).
    """

    __slots__ = ("_offset", "loop")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._offset = anyio.current_time() - monotonic()

    def __call__(self) -> float:
        return monotonic() + self._offset


class SendLock:
    """A lock for one request's sends, free of any checkpoint when nobody holds it.

    The app's sends and a passed deadline's take turns through it. Uncontended (nearly every
    delta), acquiring costs a flag check; a waiter is handed the lock in order, and a waiter
    cancelled while queued gives its turn to the next.

    Besides ``async with``, the lock can be taken in two steps, :meth:`acquire_nowait` and, only
    if that fails, ``await`` :meth:`acquire`; then released with :meth:`release`. The per-delta
    path does so to skip the two coroutines ``async with`` costs when nobody else is sending.
    """

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[anyio.Event] | None = None  # made on the first wait: most requests never wait

    def acquire_nowait(self) -> bool:
        """Take the lock if nobody holds it; return whether it was taken."""
        if self._held:
            return False
        self._held = True
        return True

    async def acquire(self) -> None:
        """Take the lock, waiting for its turn if somebody holds it (no checkpoint if nobody does)."""
        if not self._held:
            self._held = True
            return
        turn = anyio.Event()
        if self._waiters is None:
            self._waiters = deque()
        waiters = self._waiters
        waiters.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():
                self.release()  # handed the lock as it was cancelled: pass it on
            else:
                waiters.remove(turn)
            raise

    def release(self) -> None:
        """Give the lock to the next in line, or free it if nobody waits."""
        if self._waiters:
            self._waiters.popleft().set()  # the lock stays held, by the next in line
        else:
            self._held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
