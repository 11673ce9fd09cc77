"""The user contract, as a user meets it: the documented rule file verbatim, one ``add_middleware`` line.

The rule file below is the documented schema-version-1 example, key for key, with its plugin
``mypackage.checks:ToxicityRule`` written into a temporary directory on the import path. It is
checked with the ``guardrail`` command, loaded, and put in front of a FastAPI app served by
uvicorn on 127.0.0.1; the official openai SDK is the client.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from click.testing import CliRunner
from fastapi import FastAPI
from prometheus_client import REGISTRY
from starlette.responses import StreamingResponse

from guardrail import GuardrailMiddleware
from guardrail.cli import main
from guardrail.config import load_rules
from guardrail.core.rule import Action, Fallback
from guardrail.rules.banned import BannedPatterns
from guardrail.rules.budget import TokenBudget
from guardrail.tokenizers import get_encoding
from tests.apps import ChatChunks, joined_content, sdk_chat, split_events
from tests.servers import guardrail_command, serve_in_thread

DOCUMENTED_RULES = """\
version: 1
tokenizer: o200k_base            # tiktoken encoding or model name
paths: ["/v1/*"]                 # which request paths are guarded; default: all
rules:
  - name: api-keys               # unique; the `rule` label in metrics
    type: banned_patterns
    patterns: ['sk-[A-Za-z0-9]{20,}']       # regex-module syntax
    phrases: ["project starlight"]          # literal, case-insensitive, word-bounded
    action: redact
    replacement: "[redacted]"
  - name: completion-budget
    type: token_budget
    max_tokens: 400              # client receives exactly 400 tokens, then finish "length"
    action: abort
  - name: stalled
    type: idle_timeout
    seconds: 8                   # gap between content deltas; keep-alive comments don't count
    first_token_seconds: 30      # optional
    total_seconds: 300           # optional
    action: fallback
    fallback: try-again
  - name: my-check
    type: mypackage.checks:ToxicityRule    # a plugin: import path or entry point name
    action: log
fallbacks:
  try-again:
    text: "The model stopped responding. Please try again."
  backup-model:
    url: http://127.0.0.1:11434/v1/chat/completions
    model: llama3.2
"""

# The plugin the rule file names: it objects to the word "dimwit", holding back only a possible start of it.
TOXICITY_PLUGIN = """
from guardrail.core.rule import Hit, Verdict

WORD = "dimwit"


class ToxicityChecker:
    def __init__(self) -> None:
        self.text = ""
        self.reported = 0

    def _verdict(self, final: bool) -> Verdict:
        hits = []
        start = self.text.find(WORD, self.reported)
        while start != -1:
            hits.append(Hit(start, start + len(WORD), "toxic word"))
            self.reported = start + len(WORD)
            start = self.text.find(WORD, self.reported)
        safe = len(self.text)
        if not final:
            for size in range(len(WORD) - 1, 0, -1):
                if self.text.endswith(WORD[:size]):
                    safe = max(self.reported, len(self.text) - size)
                    break
        return Verdict(safe, tuple(hits))

    def feed(self, text: str) -> Verdict:
        self.text += text
        return self._verdict(False)

    def finish(self) -> Verdict:
        return self._verdict(True)


class ToxicityRule:
    def checker(self) -> ToxicityChecker:
        return ToxicityChecker()
"""

KEY = "sk-" + "Ab3De5Gh7Jk9Mn1Pq3St5Vw7Yz"
TRY_AGAIN = "The model stopped responding. Please try again."
CHAT_PATH = "/v1/chat/completions"
UNGUARDED_PATH = "/internal/chat/completions"
SECRET_DELTAS = [
    "Your key is s",
    "k-",
    KEY[3:11],
    KEY[11:],
    ". The code name is Pro",
    "ject  Star",
    "light, you dimwit.",
]
REDACTED = "Your key is [redacted]. The code name is [redacted], you dimwit."
PROSE = (
    "Streaming hides latency: words appear as they are generated, and the reader starts before the "
    "model has finished. A guard must therefore decide about each piece of text as it passes, without "
    "the whole answer in hand, and without making ordinary words wait. "
)


@pytest.fixture
def documented_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The documented rule file in ``tmp_path``, with ``mypackage.checks`` importable from there."""
    package = tmp_path / "mypackage"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "checks.py").write_text(TOXICITY_PLUGIN, encoding="utf-8")
    rules = tmp_path / "rules.yaml"
    rules.write_text(DOCUMENTED_RULES, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield rules
    for name in ("mypackage.checks", "mypackage"):
        sys.modules.pop(name, None)


def test_the_documented_rule_file_passes_guardrail_check_as_written(documented_rules: Path) -> None:
    result = CliRunner().invoke(main, ["check", str(documented_rules)])
    assert result.exit_code == 0, result.output
    # And as a user runs it: the installed console script, the plugin found on PYTHONPATH.
    env = {**os.environ, "PYTHONPATH": str(documented_rules.parent)}
    done = subprocess.run(
        [*guardrail_command(), "check", str(documented_rules)], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_documented_rule_file_loads_every_key(documented_rules: Path) -> None:
    ruleset = load_rules(str(documented_rules))
    (group,) = ruleset.groups
    assert group.paths == ("/v1/*",)
    assert group.tokenizer == "o200k_base"
    assert [rule.name for rule in ruleset.rules] == ["api-keys", "completion-budget", "stalled", "my-check"]
    keys, budget, stalled, plugin = ruleset.rules
    assert (keys.action, keys.replacement) == (Action.REDACT, "[redacted]")
    assert isinstance(keys.rule, BannedPatterns)
    assert budget.action is Action.ABORT
    assert isinstance(budget.rule, TokenBudget)
    assert (stalled.action, stalled.fallback) == (Action.FALLBACK, Fallback("try-again", text=TRY_AGAIN))
    assert plugin.action is Action.LOG
    assert type(plugin.rule).__name__ == "ToxicityRule"
    assert ruleset.rules_for(CHAT_PATH) == ruleset.rules
    assert ruleset.rules_for(UNGUARDED_PATH) == ()


@pytest.mark.parametrize(("tokenizer", "encoding"), [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")])
def test_the_tokenizer_may_be_a_model_name(documented_rules: Path, tokenizer: str, encoding: str) -> None:
    text = DOCUMENTED_RULES.replace("tokenizer: o200k_base", f"tokenizer: {tokenizer}")
    documented_rules.write_text(text, encoding="utf-8")
    assert CliRunner().invoke(main, ["check", str(documented_rules)]).exit_code == 0
    middleware = GuardrailMiddleware(FastAPI(), rules=str(documented_rules))
    assert middleware.rules.tokenizer_for(CHAT_PATH) == tokenizer
    assert middleware.encodings[tokenizer] is get_encoding(encoding)


def streaming_app(rules: Path, deltas: list[str], *, stall: bool = False) -> FastAPI:
    """A FastAPI app streaming ``deltas`` on a guarded and an unguarded path, guarded the documented way."""
    chunks = ChatChunks()

    async def answer() -> AsyncIterator[bytes]:
        yield chunks.role()
        for delta in deltas:
            await anyio.sleep(0)
            yield chunks.content(delta)
        while stall:  # a stalled model behind a proxy that keeps the connection warm
            await anyio.sleep(0.5)
            yield b": keep-alive\n\n"
        yield chunks.finish("stop")
        yield b"data: [DONE]\n\n"

    app = FastAPI()

    @app.post(CHAT_PATH)
    async def completions() -> StreamingResponse:
        return StreamingResponse(answer(), media_type="text/event-stream")

    @app.post(UNGUARDED_PATH)
    async def internal() -> StreamingResponse:
        return StreamingResponse(answer(), media_type="text/event-stream")

    app.add_middleware(GuardrailMiddleware, rules=str(rules))
    return app


def sdk_stream(base_url: str, timeout: float = 20.0) -> tuple[str, list[str]]:
    text, reasons, _ = sdk_chat(base_url, "Tell me.", model="gpt-test", timeout=timeout)
    return text, reasons


def interventions(rule: str, action: str) -> float:
    return REGISTRY.get_sample_value("guardrail_interventions_total", {"rule": rule, "action": action}) or 0.0


def test_one_add_middleware_line_guards_the_v1_paths_with_the_documented_rule_file(documented_rules: Path) -> None:
    logged_before = interventions("my-check", "log")
    redacted_before = interventions("api-keys", "redact")
    with serve_in_thread(streaming_app(documented_rules, SECRET_DELTAS)) as base_url:
        text, reasons = sdk_stream(base_url)
        raw = httpx.post(f"{base_url}{UNGUARDED_PATH}", json={"stream": True}, timeout=20).content
    assert text == REDACTED
    assert reasons == ["stop"]
    # The metrics land in prometheus_client's default registry: the shadow-mode plugin fired once.
    assert interventions("my-check", "log") == logged_before + 1
    assert interventions("api-keys", "redact") == redacted_before + 2
    # paths: ["/v1/*"] leaves other paths alone.
    assert joined_content(split_events(raw)) == "".join(SECRET_DELTAS)


@pytest.mark.parametrize("words_per_delta", [1, 3])
def test_the_documented_budget_gives_the_client_exactly_400_tokens_then_length(
    documented_rules: Path, words_per_delta: int
) -> None:
    words = (PROSE * 12).split()
    deltas = [" ".join(words[i : i + words_per_delta]) + " " for i in range(0, len(words), words_per_delta)]
    answer = "".join(deltas)
    o200k = get_encoding("o200k_base")
    assert len(o200k.encode_ordinary(answer)) > 500
    with serve_in_thread(streaming_app(documented_rules, deltas)) as base_url:
        text, reasons = sdk_stream(base_url)
    assert answer.startswith(text)
    assert len(o200k.encode_ordinary(text)) == 400
    assert reasons == ["length"]


def test_the_documented_idle_limit_streams_the_try_again_fallback(documented_rules: Path) -> None:
    # seconds: 8 with keep-alives every 0.5 s: the silence behind them is what counts.
    with serve_in_thread(streaming_app(documented_rules, ["Let me think", " about that"], stall=True)) as base_url:
        text, reasons = sdk_stream(base_url, timeout=60)
    assert text == "Let me think about that\n\n" + TRY_AGAIN
    assert reasons == ["stop"]
