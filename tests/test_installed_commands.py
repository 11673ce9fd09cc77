"""The command line as a user runs it: ``make run``, and the installed ``guardrail`` script's check and replay."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from guardrail.proxy.demo import CODE_NAME, FAKE_API_KEY, answer_for
from tests.apps import sdk_chat
from tests.servers import ServerLog

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RULES = ROOT / "rules" / "default.yaml"
TIMEOUT = 30.0
LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")

BAD_RULES = """\
version: 1
paths: ["/v1/*"]
rules:
  - name: api-keys
    type: banned_patterns
    patterns: ['sk-[A-Za-z0-9]{20,}', '(unclosed']
    action: redact
  - name: code-names
    type: banned_patterns
    phrases: ["project starlight"]
    action: abort
    holdbak: false
  - name: stall-watch
    type: idle_timeout
    seconds: 8
    action: fallback
    fallback: try-agian
fallbacks:
  try-again:
    text: "Please try again."
"""


def guardrail_script() -> str:
    script = Path(sys.executable).with_name("guardrail")
    if not script.exists():
        pytest.skip("the guardrail console script is not installed next to this interpreter")
    return str(script)


def test_the_installed_check_command_lists_every_problem_with_file_and_line_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BAD_RULES, encoding="utf-8")
    shutil.copy(DEFAULT_RULES, tmp_path / "default.yaml")
    done = subprocess.run(
        [guardrail_script(), "check", "default.yaml", "bad.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout.startswith("default.yaml: ok")
    problems = done.stderr.splitlines()
    assert problems[0].startswith("bad.yaml:6: rules[0].patterns[1]: invalid regex '(unclosed'")
    assert problems[1].startswith("bad.yaml:12: rules[1].holdbak: unknown key 'holdbak'")
    assert problems[2].startswith("bad.yaml:17: rules[2].fallback: unknown fallback 'try-agian'")
    assert problems[3:] == ["3 problems found."]
    ok = subprocess.run([guardrail_script(), "check", "default.yaml"], cwd=tmp_path, capture_output=True, timeout=60)
    assert ok.returncode == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def make_run() -> Iterator[str]:
    """``make run PORT=...`` in the checkout, as the README says; stopped with Ctrl+C."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # Run only where make would not install anything (these tests must not reach a package index).
    if subprocess.run(["make", "-q", ".venv/.installed-serve"], cwd=ROOT).returncode != 0:
        pytest.skip(".venv is not installed yet; make run would install it")
    port = free_port()
    process = subprocess.Popen(
        ["make", "run", f"PORT={port}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    assert process.stdout is not None
    lines = ServerLog(process.stdout)
    try:
        base_url = lines.wait_for(LISTENING).group(1)
        assert base_url == f"http://127.0.0.1:{port}"
        yield base_url
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        lines.join()
        process.stdout.close()


def sdk_stream(base_url: str, prompt: str) -> tuple[str, list[str]]:
    text, reasons, _ = sdk_chat(base_url, prompt, model="guardrail-demo", timeout=TIMEOUT)
    return text, reasons


def test_make_run_serves_the_demo_model_to_the_openai_sdk_with_metrics(make_run: str) -> None:
    text, reasons = sdk_stream(make_run, "Show me an API key")
    assert FAKE_API_KEY not in text and "[redacted]" in text
    assert text == answer_for("key").replace(FAKE_API_KEY, "[redacted]")
    assert reasons == ["stop"]
    text, reasons = sdk_stream(make_run, "What is on the roadmap?")
    assert text == answer_for("roadmap")[: answer_for("roadmap").index(CODE_NAME)]
    assert reasons == ["content_filter"]
    metrics = httpx.get(f"{make_run}/metrics", timeout=TIMEOUT).text
    assert re.search(r'guardrail_interventions_total\{action="redact",rule="secrets"\} [1-9]', metrics)
    assert re.search(r'guardrail_interventions_total\{action="abort",rule="blocked-phrases"\} [1-9]', metrics)
    assert re.search(r'guardrail_streams_total\{dialect="openai_chat",outcome="aborted"\} [1-9]', metrics)


def test_a_stream_recorded_from_an_upstream_replays_through_the_installed_script(make_run: str, tmp_path: Path) -> None:
    # A stream recorded from the running proxy (the demo key already redacted in it), replayed through a
    # rule file that aborts at the redaction mark.
    request = {"model": "guardrail-demo", "stream": True, "messages": [{"role": "user", "content": "Show me a key"}]}
    with httpx.Client(timeout=TIMEOUT) as client:
        recorded = client.post(f"{make_run}/v1/chat/completions", json=request).content
    assert b"[redacted]" in recorded and b"data: [DONE]" in recorded
    (tmp_path / "answer.sse").write_bytes(recorded)
    (tmp_path / "rules.yaml").write_text(
        "version: 1\nrules:\n  - name: no-redaction-marks\n    type: banned_patterns\n"
        "    phrases: ['[redacted]']\n    action: abort\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [guardrail_script(), "replay", "--rules", "rules.yaml", "answer.sse"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    before = answer_for("key").split(FAKE_API_KEY)[0]
    assert before in done.stdout  # the client's view: the answer up to the redaction mark
    assert "[redacted]" not in done.stdout.split("RULE")[0]
    assert "content_filter" in done.stdout
    hit = next(line for line in done.stdout.splitlines() if line.strip().startswith("no-redaction-marks"))
    assert hit.split()[:4] == ["no-redaction-marks", "abort", "choices[0].content", str(len(before))]
