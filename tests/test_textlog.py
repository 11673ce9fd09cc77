"""TextLog: the text a channel released, kept as a few strings however many deltas brought it."""

from __future__ import annotations

import math
import random

from hypothesis import given, strategies as st

from guardrail.core.textlog import SMALL, TextLog


@given(st.lists(st.text(max_size=12), max_size=200))
def test_the_log_is_the_deltas_joined_and_holds_logarithmically_many_strings(deltas: list[str]) -> None:
    _check(deltas)


@given(st.lists(st.integers(0, 3 * SMALL), max_size=100))
def test_deltas_of_any_size_around_the_small_bound(sizes: list[int]) -> None:
    _check(["x" * size for size in sizes])


def test_shrinking_deltas_still_make_few_parts() -> None:
    _check(["x" * size for size in range(4 * SMALL, 0, -7)])  # with parts merged only when not shorter: many parts


def test_a_long_stream_of_small_deltas() -> None:
    chooser = random.Random(7)
    _check(["ab cd"[: chooser.randint(0, 5)] for _ in range(20_000)])


def test_a_short_answer_is_one_string() -> None:
    log = TextLog()
    for delta in ["Hello", ",", " world"]:
        log.append(delta)
    assert log._parts is None and log._last == "Hello, world"


def _check(deltas: list[str]) -> None:
    log = TextLog()
    total = longest = 0
    for delta in deltas:
        log.append(delta)
        total += len(delta)
        longest = max(longest, len(delta))
        # The newest part is short, or short and then a delta; each older one is at least SMALL characters and
        # at least twice as long as the next: n characters make at most log2(n / SMALL + 1) of them,
        # whatever the deltas' sizes (shrinking ones included).
        assert len(log._last) < SMALL + longest
        older = log._parts or []
        assert all(len(part) >= SMALL for part in older)
        assert all(len(a) >= 2 * len(b) for a, b in zip(older, older[1:], strict=False))
        assert len(older) <= math.log2(total / SMALL + 1)
    assert log.text() == "".join(deltas)
    assert bool(log) == bool("".join(deltas))
    assert log.take() == "".join(deltas)
    assert log.text() == "" and not log
