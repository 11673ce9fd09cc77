"""The request path's send lock (exclusive, fair, and safe when a waiter is cancelled) and clock."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from guardrail._types import Receive, Scope, Send
from guardrail.asgi import GuardrailMiddleware
from guardrail.asgi._sync import RequestClock, SendLock
from guardrail.config import RuleSet
from guardrail.core.rule import Action, BoundRule
from guardrail.rules.banned import BannedPatterns


@pytest.mark.anyio
async def test_holders_take_turns_in_order() -> None:
    lock = SendLock()
    order: list[str] = []
    inside = 0

    async def hold(name: str, started: anyio.Event) -> None:
        nonlocal inside
        started.set()
        async with lock:
            inside += 1
            assert inside == 1
            order.append(name)
            await anyio.sleep(0)
            inside -= 1

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            async with lock:
                for name in ("a", "b", "c"):
                    started = anyio.Event()
                    tasks.start_soon(hold, name, started)
                    await started.wait()
    assert order == ["a", "b", "c"]


async def settle() -> None:
    for _ in range(5):
        await anyio.sleep(0)


@pytest.mark.anyio
@pytest.mark.parametrize("cancel_when", ["queued", "handed"])
async def test_a_cancelled_waiter_passes_its_turn_on(cancel_when: str) -> None:
    lock = SendLock()
    first_scope = anyio.CancelScope()
    first_held = False
    second_held = anyio.Event()

    async def first() -> None:
        nonlocal first_held
        with first_scope:
            async with lock:
                first_held = True

    async def second() -> None:
        async with lock:
            second_held.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            await lock.__aenter__()
            tasks.start_soon(first)
            await settle()
            tasks.start_soon(second)
            await settle()
            if cancel_when == "queued":
                first_scope.cancel()
                await settle()
                await lock.__aexit__(None, None, None)
            else:
                await lock.__aexit__(None, None, None)  # hands the lock to `first`...
                first_scope.cancel()  # ...which is cancelled before it runs
            await second_held.wait()
    # Queued, it leaves the line; handed the lock, it may take its turn before it sees the
    # cancellation. Either way the next waiter gets the lock and nothing deadlocks.
    assert not first_held or cancel_when == "handed"
    with anyio.fail_after(1):
        async with lock:
            pass  # and the lock is free again


@pytest.mark.anyio
async def test_the_request_clock_agrees_with_anyio() -> None:
    clock = RequestClock()
    assert abs(clock() - anyio.current_time()) < 0.05


@pytest.mark.anyio
async def test_the_lock_taken_in_two_steps_is_the_same_lock() -> None:
    lock = SendLock()
    assert lock.acquire_nowait()
    assert not lock.acquire_nowait()  # held: the caller must wait its turn
    got_it = anyio.Event()

    async def wait_for_it() -> None:
        await lock.acquire()
        got_it.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(wait_for_it)
            await settle()
            assert not got_it.is_set()
            lock.release()  # handed to the waiter, so still held
            assert not lock.acquire_nowait()
            await got_it.wait()
    lock.release()
    async with lock:
        assert not lock.acquire_nowait()
    assert lock.acquire_nowait()


def test_the_middleware_keeps_one_clock_per_event_loop() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        pass

    rules = RuleSet.from_rules([BoundRule("banned", BannedPatterns(phrases=["x"]), Action.ABORT)])
    middleware = GuardrailMiddleware(app, rules=rules)

    async def two_reads() -> tuple[RequestClock, RequestClock, float]:
        loop = asyncio.get_running_loop()
        first, second = middleware.clock(loop), middleware.clock(loop)
        return first, second, abs(first() - loop.time())

    first, second, off = asyncio.run(two_reads())
    assert first is second and off < 0.05
    third, _, off = asyncio.run(two_reads())  # another loop: a clock of its own, on its time
    assert third is not first and third.loop is not first.loop and off < 0.05
