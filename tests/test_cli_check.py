"""``guardrail check``: exit codes and the exact lines it prints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from guardrail.cli import main
from guardrail.config import load_rules

DATA = Path(__file__).parent / "data" / "rules"
REPO = Path(__file__).parent.parent


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for name in ("bad.yaml", "valid.yaml"):
        shutil.copy(DATA / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def test_bad_regex_unknown_key_and_unknown_fallback_are_all_reported(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check", "bad.yaml"])

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "bad.yaml:8: rules[0].patterns[1]: invalid regex 'sk-[A-Za-z0-9': unterminated character set at position 13",
        "bad.yaml:14: rules[1].replacment: unknown key 'replacment'; did you mean 'replacement'?",
        "bad.yaml:19: rules[2].fallback: unknown fallback 'try-agian'; defined fallbacks: try-again",
        "3 problems found.",
    ]


def test_valid_files_print_ok_and_exit_0(runner: CliRunner) -> None:
    shutil.copy(REPO / "rules" / "default.yaml", "default.yaml")

    result = runner.invoke(main, ["check", "valid.yaml", "default.yaml"])

    assert result.exit_code == 0, result.output
    default_rules = len(load_rules(REPO / "rules" / "default.yaml").rules)
    assert result.stdout.splitlines() == ["valid.yaml: ok (3 rules)", f"default.yaml: ok ({default_rules} rules)"]
    assert result.stderr == ""


def test_valid_files_are_still_reported_ok_when_another_is_not(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check", "valid.yaml", "missing.yaml"])

    assert result.exit_code == 1
    assert result.stdout.splitlines() == ["valid.yaml: ok (3 rules)"]
    assert result.stderr.splitlines() == [
        "missing.yaml: cannot read the file: No such file or directory",
        "1 problem found.",
    ]


def test_files_are_checked_together(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check", "valid.yaml", "valid.yaml"])

    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == (
        "valid.yaml:6: rules[0].name: duplicate rule name 'api-keys'; "
        "it is already used at line 6 (names must be unique)"
    )


def test_one_rule_is_singular(runner: CliRunner) -> None:
    Path("one.yaml").write_text("version: 1\nrules:\n  - {name: a, type: banned_patterns, phrases: [x], action: log}\n")

    result = runner.invoke(main, ["check", "one.yaml"])

    assert (result.exit_code, result.stdout) == (0, "one.yaml: ok (1 rule)\n")


def test_no_files_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check"])

    assert result.exit_code == 2
    assert "give at least one rule file to check (or --schema)" in result.stderr


def test_schema_prints_the_json_schema(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check", "--schema"])

    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "guardrail rule file"
    assert "rules" in schema["required"]


def test_help_describes_the_output(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check", "--help"])

    assert result.exit_code == 0
    assert "FILE:LINE: KEY.PATH: MESSAGE" in result.stdout
    assert "guardrail check rules/default.yaml" in result.stdout
    assert "check" in runner.invoke(main, ["--help"]).stdout


FALLBACK_URLS = """\
version: 1
rules: []
allow_empty: true
fallbacks:
  base: {url: "http://127.0.0.1:11434/v1"}
  endpoint: {url: "https://api.example/v1/chat/completions"}
  ollama-native: {url: "http://127.0.0.1:11434/api/chat"}
  models: {url: "http://127.0.0.1:8001/v1/models"}
  half-endpoint: {url: "http://127.0.0.1:8001/v1/chat"}
"""


def test_fallback_urls_that_cannot_work_are_flagged_with_the_forms_that_can(runner: CliRunner) -> None:
    Path("fallbacks.yaml").write_text(FALLBACK_URLS, encoding="utf-8")

    result = runner.invoke(main, ["check", "fallbacks.yaml"])

    assert result.exit_code == 1
    forms = (
        "give the base URL, as for --upstream (http://host/v1), or a chat endpoint (http://host/v1/chat/completions)"
    )
    assert result.stderr.splitlines() == [
        "fallbacks.yaml:7: fallbacks.ollama-native.url: 'http://127.0.0.1:11434/api/chat' cannot work: "
        f"Ollama's native /api/chat answers in NDJSON, which a fallback cannot stream; {forms}",
        "fallbacks.yaml:8: fallbacks.models.url: 'http://127.0.0.1:8001/v1/models' cannot work: "
        f"/models lists models and answers no prompt; {forms}",
        "fallbacks.yaml:9: fallbacks.half-endpoint.url: 'http://127.0.0.1:8001/v1/chat' cannot work: "
        f"/chat is not an endpoint (the chat endpoint is /chat/completions); {forms}",
        "3 problems found.",
    ]
