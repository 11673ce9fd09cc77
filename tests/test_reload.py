"""Hot reload of rule files while ``guardrail serve``'s app runs (issue 6, acceptance 5).

The app is served in a thread with a short poll interval; each test waits (bounded) for the
reload to be observed, never for a fixed time.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

from guardrail._types import Receive, Scope, Send
from guardrail.exceptions import ConfigError
from guardrail.metrics import GuardMetrics
from guardrail.proxy.app import GuardingProxy, ServeSettings, build_app
from guardrail.proxy.reload import ReloadingGuard
from tests.apps import CHAT_PATH, DONE, SSE_HEADERS, ChatChunks, finish_reasons, joined_content, split_events
from tests.servers import serve_in_thread

TIMEOUT = 10.0
POLL_SECONDS = 0.02
CHUNKS = ChatChunks()
ANSWER = ["The plan is ", "called Project ", "Starlight, and it ", "ships soon."]

RULES = """\
version: 1
rules:
  - name: code-names
    type: banned_patterns
    phrases: ["project starlight"]
    action: {action}
"""
BROKEN = """\
version: 1
rules:
  - name: code-names
    type: banned_patterns
    phrasez: ["project starlight"]
    action: abort
"""


class GatedModel:
    """Streams ``ANSWER``: the first delta at once, the rest once the test opens ``gate`` (if it is closed)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)})
        events = CHUNKS.stream(ANSWER)
        await send({"type": "http.response.body", "body": b"".join(events[:2]), "more_body": True})
        while not self.gate.is_set():
            await anyio.sleep(0.005)
        for event in events[2:]:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def ask(base_url: str) -> tuple[str, list[tuple[int, str]]]:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "plans?"}]}
    response = httpx.post(f"{base_url}{CHAT_PATH}", json=body, timeout=TIMEOUT)
    events = split_events(response.content)
    return joined_content(events), finish_reasons(events)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def write(path: Path, text: str) -> None:
    # Write-then-rename, as editors do: the poller never sees half a file.
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, GuardingProxy, GatedModel, Path]]:
    rule_file = tmp_path / "rules.yaml"
    write(rule_file, RULES.format(action="abort"))
    model = GatedModel()
    settings = ServeSettings((str(rule_file),))
    app = build_app(settings, registry=CollectorRegistry(), model=model, poll_seconds=POLL_SECONDS)
    with serve_in_thread(app) as base_url:
        yield base_url, app, model, rule_file


FULL = "".join(ANSWER)
CUT = "The plan is called "


def test_an_edited_rule_file_changes_the_next_stream(served: tuple[str, GuardingProxy, GatedModel, Path]) -> None:
    base_url, app, _, rule_file = served
    assert ask(base_url) == (CUT, [(0, "content_filter")])
    write(rule_file, RULES.format(action="log"))
    wait_until(lambda: app.guard.generation == 1, "the reload")
    assert ask(base_url) == (FULL, [(0, "stop")])


def test_a_broken_rule_file_is_refused_and_the_old_rules_stay(
    served: tuple[str, GuardingProxy, GatedModel, Path], caplog: pytest.LogCaptureFixture
) -> None:
    base_url, app, _, rule_file = served
    caplog.set_level(logging.ERROR, logger="guardrail.proxy.reload")
    write(rule_file, BROKEN)
    wait_until(lambda: any("refused" in record.getMessage() for record in caplog.records), "the refusal")
    wait_until(lambda: any(f"{rule_file}:5" in record.getMessage() for record in caplog.records), "the problem")
    assert app.guard.generation == 0
    assert ask(base_url) == (CUT, [(0, "content_filter")])
    # Once fixed, the file loads again.
    write(rule_file, RULES.format(action="log"))
    wait_until(lambda: app.guard.generation == 1, "the reload")
    assert ask(base_url) == (FULL, [(0, "stop")])


def test_a_stream_in_flight_keeps_the_rules_it_started_with(
    served: tuple[str, GuardingProxy, GatedModel, Path],
) -> None:
    base_url, app, model, rule_file = served
    model.gate.clear()
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "plans?"}]}
    with httpx.Client(timeout=TIMEOUT) as client:
        with client.stream("POST", f"{base_url}{CHAT_PATH}", json=body) as response:
            chunks = response.iter_raw()
            first = next(chunks)  # the stream has started under the abort rule
            write(rule_file, RULES.format(action="log"))
            wait_until(lambda: app.guard.generation == 1, "the reload")
            model.gate.set()
            wire = first + b"".join(chunks)
    events = split_events(wire)
    assert (joined_content(events), finish_reasons(events)) == (CUT, [(0, "content_filter")])
    assert events[-1].raw == DONE
    model.gate.set()
    assert ask(base_url) == (FULL, [(0, "stop")])


@pytest.mark.anyio
async def test_sighup_reloads_the_rules(tmp_path: Path) -> None:
    rule_file = tmp_path / "rules.yaml"
    write(rule_file, RULES.format(action="abort"))
    # A long poll: only the signal can make this reload.
    metrics = GuardMetrics(CollectorRegistry())
    guard = ReloadingGuard(GatedModel(), paths=[str(rule_file)], metrics=metrics, poll_seconds=3600)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tasks:
            await tasks.start(guard.watch)  # returns once SIGHUP is handled
            os.kill(os.getpid(), signal.SIGHUP)
            while guard.generation == 0:
                await anyio.sleep(0.01)
            tasks.cancel_scope.cancel()
    assert guard.generation == 1


def test_new_rule_names_are_declared_in_the_shared_metrics(tmp_path: Path) -> None:
    rule_file = tmp_path / "rules.yaml"
    write(rule_file, RULES.format(action="abort"))
    registry = CollectorRegistry()
    guard = ReloadingGuard(GatedModel(), paths=[str(rule_file)], metrics=GuardMetrics(registry))
    write(rule_file, RULES.format(action="abort").replace("code-names", "renamed"))
    assert anyio.run(guard.reload)
    assert registry.get_sample_value("guardrail_interventions_total", {"rule": "renamed", "action": "abort"}) == 0
    assert [rule.name for rule in guard.rules.rules] == ["renamed"]


def test_a_broken_file_at_start_is_an_error(tmp_path: Path) -> None:
    rule_file = tmp_path / "rules.yaml"
    write(rule_file, BROKEN)
    with pytest.raises(ConfigError) as raised:
        ReloadingGuard(GatedModel(), paths=[str(rule_file)], metrics=GuardMetrics(CollectorRegistry()))
    assert "unknown key 'phrasez'" in str(raised.value)
