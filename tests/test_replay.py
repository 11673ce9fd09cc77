"""``guardrail replay``: a recorded stream through a rule file, offline (issue 6, acceptance 4).

The recordings in ``tests/data/streams`` are the demo model's answers as ``curl -N`` saves them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from guardrail.cli import main
from guardrail.config import load_rules
from guardrail.proxy.demo import CODE_NAME, FAKE_API_KEY, answer_for
from guardrail.replay import replay, split_events, strip_http_head

ROOT = Path(__file__).resolve().parent.parent
STREAMS = Path(__file__).parent / "data" / "streams"
SECRET = STREAMS / "demo-secret.sse"
CODENAME = STREAMS / "demo-codename.sse"
DEFAULT_RULES = str(ROOT / "rules" / "default.yaml")


def invoke(*args: str, input: bytes | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["replay", *args], input=input)
    return result.exit_code, result.stdout, result.stderr


def test_replay_shows_the_redacted_text_and_the_hit() -> None:
    code, out, _ = invoke("--rules", DEFAULT_RULES, str(SECRET))
    assert code == 0, out
    expected = answer_for("key").replace(FAKE_API_KEY, "[redacted]")
    assert f"    | {expected}" in out
    assert "finish_reason: choices[0] stop" in out
    assert "[DONE]: yes" in out
    start = answer_for("key").index(FAKE_API_KEY)
    hit_row = next(line for line in out.splitlines() if line.strip().startswith("secrets"))
    assert hit_row.split()[:6] == ["secrets", "redact", "choices[0].content", str(start), str(start + 48), "0"]
    assert "RULE" in out and "LEAKED" in out
    assert "Outcome: completed" in out


def test_replay_json_shows_an_abort() -> None:
    code, out, _ = invoke("--rules", DEFAULT_RULES, "--json", str(CODENAME))
    assert code == 0
    result = json.loads(out)
    answer = answer_for("roadmap")
    assert result["client"] == {
        "text": {"choices[0].content": answer[: answer.index(CODE_NAME)]},
        "finish_reasons": {"0": "content_filter"},
        "done": True,
        "errors": [],
    }
    assert [(hit["rule"], hit["action"], hit["start"]) for hit in result["hits"]] == [
        ("blocked-phrases", "abort", answer.index(CODE_NAME))
    ]
    assert (result["outcome"], result["rule"], result["fallback"]) == ("aborted", "blocked-phrases", None)


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_any_chunking_gives_the_same_client_view(chunk_size: int) -> None:
    rules = load_rules(DEFAULT_RULES).rules_for("/v1/chat/completions")
    data = SECRET.read_bytes()
    by_event = replay(data, rules)
    by_bytes = replay(data, rules, chunk_size=chunk_size)
    assert by_bytes.client == by_event.client
    assert by_bytes.hits == by_event.hits
    assert by_event.chunks == len(split_events(data)) and by_event.chunks > 50


def test_chunk_size_option_and_stdin() -> None:
    code, out, _ = invoke("--rules", DEFAULT_RULES, "--chunk-size", "5", "--json", "-", input=SECRET.read_bytes())
    assert code == 0
    assert json.loads(out)["chunks"] == -(-SECRET.stat().st_size // 5)


def test_a_curl_i_capture_has_its_http_head_skipped() -> None:
    body = CODENAME.read_bytes()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"
    assert strip_http_head(head + body) == body
    rules = load_rules(DEFAULT_RULES).rules
    assert replay(head + body, rules).client == replay(body, rules).client


def test_an_error_event_and_a_missing_done_are_shown(tmp_path: Path) -> None:
    recording = tmp_path / "broken.sse"
    first = SECRET.read_bytes().split(b"\n\n")[:3]
    error = b'data: {"error":{"message":"The server had an error","type":"server_error","code":null}}\n\n'
    recording.write_bytes(b"\n\n".join(first) + b"\n\n" + error)
    code, out, _ = invoke("--rules", DEFAULT_RULES, str(recording))
    assert code == 0
    assert "[DONE]: no" in out
    assert "error event: The server had an error" in out
    assert "Rule hits: none" in out


def test_a_url_fallback_says_where_the_stream_would_branch(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        """\
version: 1
rules:
  - name: code-names
    type: banned_patterns
    phrases: ["project starlight"]
    action: fallback
    fallback: backup
fallbacks:
  backup:
    url: http://user:secret@127.0.0.1:11434/v1/chat/completions
    model: llama3.2
""",
        encoding="utf-8",
    )
    code, out, _ = invoke("--rules", str(rules), str(CODENAME))
    assert code == 0
    assert "Outcome: fallback (rule code-names)" in out
    assert "fallback 'backup' from http://127.0.0.1:11434/v1/chat/completions" in out
    assert "secret" not in out


def test_unreadable_input_exits_1(tmp_path: Path) -> None:
    code, _, err = invoke("--rules", DEFAULT_RULES, str(tmp_path / "missing.sse"))
    assert code == 1 and "cannot read the recording" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 2\n", encoding="utf-8")
    code, _, err = invoke("--rules", str(broken), str(SECRET))
    assert code == 1 and f"{broken}:1" in err


@pytest.mark.parametrize(
    "args",
    [
        [str(SECRET)],  # no --rules
        ["--rules", DEFAULT_RULES],  # no STREAM_FILE
        ["--rules", DEFAULT_RULES, "--chunk-size", "0", str(SECRET)],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    code, _, _ = invoke(*args)
    assert code == 2


def test_replay_help_reads_well() -> None:
    result = CliRunner().invoke(main, ["replay", "--help"])
    assert result.exit_code == 0
    for words in ("--rules FILE", "STREAM_FILE", "--chunk-size N", "--json", "what the client"):
        assert words in result.output
