"""One request cannot stall the others: what the guard does with an 8 MB prompt and a hostile pattern.

How long the other streams wait is measured in ``bench/stall.py`` (not timed here); this checks
that both requests are handled as documented.
"""

from __future__ import annotations

import json

import anyio
import pytest

from guardrail.asgi import GuardrailMiddleware
from guardrail.config import RuleSet
from guardrail.core.rule import Action, BoundRule
from guardrail.rules.banned import BannedPatterns
from guardrail.rules.budget import TokenBudget
from guardrail.tokenizers import get_encoding
from tests.apps import CHAT_PATH, SSE_HEADERS, ChatChunks, Receiver, Recorder, SteppedApp, http_scope, replay_app

pytestmark = pytest.mark.anyio


def rules() -> RuleSet:
    encoding = get_encoding("o200k_base")
    return RuleSet.from_rules(
        [
            BoundRule("budget", TokenBudget(encoding, max_prompt_tokens=100_000), Action.ABORT),
            BoundRule("hostile", BannedPatterns(patterns=[r"(?:a|aa)+(?:a|aa)*b"]), Action.ABORT),
        ],
        paths=["/v1/*"],
    )


@pytest.mark.parametrize("size", [5 * 1024 * 1024, 9 * 1024 * 1024])
async def test_a_prompt_too_large_to_count_is_refused_under_a_prompt_budget(size: int) -> None:
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "x " * (size // 2)}]})
    called = []

    async def app(scope: object, receive: object, send: object) -> None:
        called.append(True)

    recorder = Recorder()
    with anyio.fail_after(10):
        await GuardrailMiddleware(app, rules=rules())(http_scope(CHAT_PATH), Receiver(body.encode()), recorder)
    assert recorder.start["status"] == 400
    assert json.loads(recorder.body)["error"]["code"] == "prompt_too_long"
    assert called == []


async def test_a_pattern_past_its_time_budget_ends_the_stream_with_an_error() -> None:
    chunks = ChatChunks()
    messages = SteppedApp(
        [chunks.role(), chunks.content("a" * 30 + "!"), chunks.finish()], headers=SSE_HEADERS
    ).messages
    recorder = Recorder()
    with anyio.fail_after(10):
        await GuardrailMiddleware(replay_app(messages), rules=rules())(http_scope(CHAT_PATH), Receiver(), recorder)
    error = json.loads(recorder.events[-1].data or "{}")["error"]
    assert error["code"] == "rule_error"
    assert "a" * 30 not in recorder.content
