"""``guardrail try PROMPT`` against a real ``guardrail serve``: the answer, how it ended, the rules that fired."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from guardrail._types import Receive, Scope, Send
from guardrail.cli import main
from guardrail.proxy.demo import CODE_NAME, FAKE_API_KEY, answer_for
from tests.apps import read_body
from tests.servers import guardrail_command, serve_command, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def guard() -> Iterator[str]:
    """``guardrail serve`` with no arguments but a free port: the demo model, the packaged default rules."""
    with serve_command([*guardrail_command(), "serve", "--port", "0"], cwd=ROOT) as (base_url, _):
        yield base_url


def try_prompt(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["try", *args])
    return result.exit_code, result.output


def test_try_prints_the_redacted_answer_then_how_it_ended_and_the_rule(guard: str) -> None:
    code, output = try_prompt("--url", guard, "What is the API key?")
    answer = answer_for("key").replace(FAKE_API_KEY, "[redacted]")
    text, _, summary = output.partition("\n\nfinish_reason:")
    assert code == 0 and text == answer and FAKE_API_KEY not in output
    lines = summary.splitlines()
    assert lines[:2] == [" stop", "rules fired: secrets (redact)"]
    assert lines[2].startswith("request id: ")


def test_try_shows_a_cut_answer_and_the_rule_that_cut_it(guard: str) -> None:
    code, output = try_prompt("--url", guard, "What is on the roadmap?")
    cut = answer_for("roadmap")[: answer_for("roadmap").index(CODE_NAME)]
    assert code == 0 and output.startswith(cut + "\n\n") and CODE_NAME not in output
    assert "finish_reason: content_filter\nrules fired: blocked-phrases (abort)\n" in output


def test_try_says_when_no_rule_fired(guard: str) -> None:
    code, output = try_prompt("--url", guard, "Hello")
    assert code == 0 and "finish_reason: stop\nrules fired: none\n" in output


async def refusing(scope: Scope, receive: Receive, send: Send) -> None:
    """A guard that refuses the chat endpoint and has no /metrics."""
    if scope["type"] != "http":
        return
    await read_body(receive)
    forbidden = scope["path"] == "/v1/chat/completions"
    body = json.dumps({"error": {"message": "not guarded here", "code": "endpoint_not_guarded"}}).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 403 if forbidden else 404, "headers": headers})
    await send({"type": "http.response.body", "body": body if forbidden else b""})


def test_try_reports_a_refusal_with_its_status_and_code() -> None:
    with serve_in_thread(refusing, lifespan="off") as base_url:
        code, output = try_prompt("--url", base_url, "Hello")
    assert code == 1
    assert output.splitlines()[-4:-1] == [
        "HTTP status: 403",
        "error: endpoint_not_guarded: not guarded here",
        "rules fired: unknown (the guard serves no /metrics)",
    ]


def test_try_says_how_to_start_a_guard_when_none_answers() -> None:
    code, output = try_prompt("--url", "http://127.0.0.1:9", "Hello")
    assert code == 1
    assert output == (
        "no guard answered at http://127.0.0.1:9 (ConnectError): start one with `make run` or `guardrail serve`, "
        "or give its address with --url\n"
    )
