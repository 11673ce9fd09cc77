"""TextLog: the text a channel released, kept as a few strings however many deltas brought it."""

from __future__ import annotations

import math

from hypothesis import given, strategies as st

from guardrail.core.textlog import TextLog


@given(st.lists(st.text(max_size=12), max_size=200))
def test_the_log_is_the_deltas_joined_and_holds_logarithmically_many_strings(deltas: list[str]) -> None:
    _check(deltas)


def test_shrinking_deltas_still_make_few_parts() -> None:
    _check(["x" * size for size in range(40, 0, -1)])  # with parts merged only when not shorter: 40 parts


def _check(deltas: list[str]) -> None:
    log = TextLog()
    for delta in deltas:
        log.append(delta)
        # Each part is at least twice as long as the next: n characters make at most log2(n + 1)
        # parts, whatever the deltas' sizes (shrinking ones included).
        assert len(log._parts) <= math.log2(sum(map(len, deltas)) + 1)
    assert log.text() == "".join(deltas)
    assert bool(log) == bool("".join(deltas))
    assert log.take() == "".join(deltas)
    assert log.text() == "" and not log
