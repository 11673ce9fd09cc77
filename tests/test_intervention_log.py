"""In middleware mode every intervention is logged once, at WARNING, by a ``guardrail`` logger: rule, action,
request id, never the model's text; ``logging.getLogger("guardrail")`` turns it down.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from prometheus_client import CollectorRegistry

from guardrail.asgi import GuardrailMiddleware
from guardrail.config import RuleSet
from guardrail.core.rule import Action, BoundRule, Fallback, Verdict
from guardrail.metrics import GuardMetrics
from guardrail.rules.banned import BannedPatterns
from tests.apps import SSE_HEADERS, ChatChunks, Receiver, Recorder, http_scope, replay_app

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-" + "Q1w2E3r4T5y6U7i8O9p0A1s2D3f4"
SECRET_TEXT = "the launch date is March 3rd"
CHAT = ChatChunks()


class FailingRule:
    """A plugin that raises with the model's text in its message."""

    def checker(self) -> FailingChecker:
        return FailingChecker()


class FailingChecker:
    def feed(self, text: str) -> Verdict:
        raise ValueError(f"cannot judge {text!r}")

    def finish(self) -> Verdict:
        return Verdict(0)


def rule(name: str, action: Action, fallback: Fallback | None = None) -> BoundRule:
    banned = BannedPatterns(patterns=[r"(?<![A-Za-z0-9])sk-[A-Za-z0-9]{20,}"], phrases=["project starlight"])
    return BoundRule(name, banned, action, fallback=fallback)


async def stream_through(rules: Sequence[BoundRule], deltas: Sequence[str], request_id: str) -> Recorder:
    app = replay_app(
        [
            {"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)},
            *({"type": "http.response.body", "body": event, "more_body": True} for event in CHAT.stream(deltas)),
            {"type": "http.response.body", "body": b"", "more_body": False},
        ]
    )
    metrics = GuardMetrics(CollectorRegistry())
    middleware = GuardrailMiddleware(app, rules=RuleSet.from_rules(list(rules)), metrics=metrics)
    scope = http_scope()
    scope["headers"] = [*scope["headers"], (b"x-request-id", request_id.encode())]
    recorder = Recorder()
    with anyio.fail_after(5):
        await middleware(scope, Receiver(), recorder)
    return recorder


CASES = [
    pytest.param(
        [rule("keys", Action.REDACT)],
        [f"Here: {KEY}. ", f"Again: {KEY}."],
        ["keys: redact", "keys: redact"],
        id="redact",
    ),
    pytest.param(
        [rule("names", Action.ABORT)],
        ["On the roadmap: Project Starlight, ", SECRET_TEXT],
        ["names: abort"],
        id="abort",
    ),
    pytest.param(
        [rule("names", Action.FALLBACK, fallback=Fallback("sorry", text="Sorry."))],
        ["It is Project Starlight. ", SECRET_TEXT],
        ["names: fallback"],
        id="fallback",
    ),
    pytest.param(
        [BoundRule("judge", FailingRule(), Action.ABORT)], [SECRET_TEXT], ["judge failed: rule_error"], id="rule-error"
    ),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("rules", "deltas", "logged"), CASES)
async def test_each_intervention_is_logged_once_at_warning_without_model_text(
    rules: list[BoundRule], deltas: list[str], logged: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="guardrail")
    await stream_through(rules, deltas, "req-42")
    warnings = [entry for entry in caplog.records if entry.levelno >= logging.WARNING]
    assert [entry.name.split(".")[0] for entry in warnings] == ["guardrail"] * len(logged)
    for entry, expected in zip(warnings, logged, strict=True):
        message = entry.getMessage()
        assert message.startswith(f"rule {expected}") and message.endswith("(request req-42)"), message
    for entry in caplog.records:
        if entry.levelno >= logging.INFO:
            message = entry.getMessage()
            assert KEY not in message and "Starlight" not in message and SECRET_TEXT not in message, message


@pytest.mark.anyio
async def test_an_app_can_turn_the_intervention_log_down(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("guardrail").setLevel(logging.ERROR)
    try:
        await stream_through([rule("keys", Action.REDACT)], [f"Here: {KEY}."], "req-7")
    finally:
        logging.getLogger("guardrail").setLevel(logging.NOTSET)
    assert not [entry for entry in caplog.records if entry.name.startswith("guardrail")]


SHOW_DEFAULT = """\
import anyio
from tests.test_intervention_log import KEY, rule, stream_through
from guardrail.core.rule import Action
anyio.run(stream_through, [rule("keys", Action.REDACT)], ["Here: " + KEY + "."], "req-9")
"""


def test_an_app_that_configures_no_logging_still_shows_interventions_on_stderr() -> None:
    done = subprocess.run([sys.executable, "-c", SHOW_DEFAULT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "rule keys: redact on choices[0].content at 6-37 (request req-9)\n"
