"""Zero leak: streams drawn from the whole grammar a dialect accepts, banned text placed anywhere.

For every drawn stream and both cutting actions, the raw bytes the client receives, with JSON
strings decoded and each channel's text joined across events as a client joins it, hold no
banned match. ``bench/zero_leak.py`` runs the same check 100,000 times per dialect.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from guardrail.core.engine import StreamGuard
from guardrail.core.outputs import Send
from guardrail.core.rule import Action
from guardrail.core.sse import SSEDecoder
from tests import leakgrammar
from tests.leakgrammar import DETECT, leaks


def guarded(body: bytes, action: Action, rng: random.Random) -> bytes:
    guard = StreamGuard(leakgrammar.rules(action))
    outputs = [output for chunk in leakgrammar.rechunk(rng, body) for output in guard.feed(chunk)]
    outputs += guard.close()
    return b"".join(output.data for output in outputs if isinstance(output, Send))


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), action=st.sampled_from([Action.REDACT, Action.ABORT]))
def test_no_chat_stream_from_the_grammar_leaks_a_banned_match(seed: int, action: Action) -> None:
    rng = random.Random(seed)
    body = leakgrammar.chat_stream(rng)
    wire = guarded(body, action, rng)
    assert leaks(leakgrammar.chat_client(wire)) == []


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_an_abort_keeps_everything_before_the_first_match(seed: int) -> None:
    rng = random.Random(seed)
    answer = leakgrammar.text(rng)
    events = [
        json.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        for piece in leakgrammar.cut(rng, answer)
    ]
    body = "".join(f"data: {event}\n\n" for event in events).encode() + b"data: [DONE]\n\n"
    wire = guarded(body, Action.ABORT, rng)
    content = _content(wire)
    first = DETECT.search(answer)
    limit = answer if first is None else answer[: first.start()]
    # A cut can complete a match before it (a phrase then bounded by the end): the guard keeps at
    # least the text before every such match, and never a match.
    least = limit
    while (edge := DETECT.search(least)) is not None:
        least = least[: edge.start()]
    assert limit.startswith(content) and content.startswith(least), (answer, content)
    assert DETECT.search(content) is None


def _content(wire: bytes) -> str:
    out = []
    decoder = SSEDecoder()
    for event in [*decoder.feed(wire), *decoder.close()]:
        if event.data and event.data.startswith("{"):
            for choice in json.loads(event.data).get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if isinstance(content, str):
                    out.append(content)
    return "".join(out)


@pytest.mark.parametrize("action", [Action.REDACT, Action.ABORT])
def test_the_grammar_does_put_banned_text_on_the_wire(action: Action) -> None:
    """The check can fail: unguarded, the drawn streams show banned text to the client."""
    rng = random.Random(7)
    found = sum(bool(leaks(leakgrammar.chat_client(leakgrammar.chat_stream(rng)))) for _ in range(50))
    assert found > 25


@pytest.mark.parametrize("dialect", sorted(set(leakgrammar.DIALECTS) - {"openai_chat"}))
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), action=st.sampled_from([Action.REDACT, Action.ABORT]))
def test_no_stream_of_another_dialect_leaks_a_banned_match(dialect: str, seed: int, action: Action) -> None:
    generate, read, start = leakgrammar.DIALECTS[dialect]
    rng = random.Random(seed)
    body = generate(rng)
    guard = start(leakgrammar.rules(action))
    outputs = [output for chunk in leakgrammar.rechunk(rng, body) for output in guard.feed(chunk)]
    outputs += guard.close()
    wire = b"".join(output.data for output in outputs if isinstance(output, Send))
    assert leaks(read(wire)) == []


@pytest.mark.parametrize("dialect", sorted(set(leakgrammar.DIALECTS) - {"ollama", "text"}))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), action=st.sampled_from([Action.REDACT, Action.ABORT]))
def test_no_stream_leaks_when_its_dialect_is_told_by_its_first_event(dialect: str, seed: int, action: Action) -> None:
    from guardrail.core.dialect import Framing
    from guardrail.core.dialects import start_stream
    from guardrail.core.engine import StreamGuard

    generate, read, _ = leakgrammar.DIALECTS[dialect]
    rng = random.Random(seed)
    body = generate(rng)
    guard = StreamGuard(leakgrammar.rules(action), start_stream(None, Framing.SSE))
    outputs = [output for chunk in leakgrammar.rechunk(rng, body) for output in guard.feed(chunk)]
    outputs += guard.close()
    wire = b"".join(output.data for output in outputs if isinstance(output, Send))
    assert leaks(read(wire)) == []
