"""Every ending, read by every client: what each one sees (the README's client matrix).

One app, one guarded chat endpoint; the requested model picks how the answer ends. Each client
reads each ending through a real uvicorn server, and what it shows (its text and finish
reason, or the exception it raises with the code) must be what the table says. The Python
clients always run; the openai Node SDK runs where Node and npm are (installed once from the
registry into a cache folder), and is skipped with the reason elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import openai
import pytest
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from guardrail.asgi import GuardrailMiddleware
from guardrail.config import RuleSet
from guardrail.core.rule import Action, BoundRule, Fallback
from guardrail.rules.banned import BannedPatterns
from guardrail.rules.budget import TokenBudget
from guardrail.rules.timeout import IdleTimeout
from guardrail.tokenizers import get_encoding
from tests.apps import ChatChunks
from tests.servers import serve_in_thread

KEY = "sk-" + "Zq9Xw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe"
CHAT = ChatChunks()
BUDGET = 60  # completion tokens (the model's, a redacted key counted too); " Apollo" is one
OPENING = "The plan is called"
SORRY = "I can't talk about that."
# model: (the answer's deltas, how the app ends it)
ANSWERS: dict[str, tuple[list[str], str]] = {
    "completed": ([OPENING, " Apollo."], "done"),
    "redacted": ([OPENING, " Apollo, key ", KEY[:9], KEY[9:], "."], "done"),
    "aborted": ([OPENING, " Project", " Starlight."], "done"),
    "budget": ([OPENING, " Apollo" * 80], "done"),  # past the budget: BUDGET tokens
    "fallback": ([OPENING, " Project Nightfall."], "done"),
    "idle_timeout": ([OPENING], "stall"),
    "truncated": ([OPENING], "cut"),
    "app_error": ([OPENING], "raise"),
}
# ending: what each client shows — (text, finish reason) or "Exception(code)"
PLAIN: dict[str, tuple[str, str] | str] = {
    "completed": (OPENING + " Apollo.", "stop"),
    "redacted": (OPENING + " Apollo, key [redacted].", "stop"),
    "aborted": (OPENING + " ", "content_filter"),
    "budget": (OPENING + " Apollo" * (BUDGET - len(get_encoding("o200k_base").encode(OPENING))), "length"),
    "fallback": (OPENING + " \n\n" + SORRY, "stop"),  # the space before "Project" had gone out
    "idle_timeout": "APIError(idle_timeout)",
    "truncated": "APIError(upstream_truncated)",
    "app_error": "APIError(upstream_error)",
}
HELPER = {
    **PLAIN,
    "aborted": "ContentFilterFinishReasonError",
    "budget": "LengthFinishReasonError",
}
NODE_SCRIPT = Path(__file__).parent / "node" / "openai_chat.mjs"
NODE_OPENAI = "openai@6"
AI_SDK_SCRIPT = Path(__file__).parent / "node" / "ai_sdk_chat.mjs"
AI_SDK = ("ai@6", "@ai-sdk/openai@3")  # the newest majors that run on Node 20
# The AI SDK's finish reasons, and its error parts (their message names the guard's code).
AI_SDK_SEEN: dict[str, tuple[str, str, list[str]]] = {
    ending: (shown[0], shown[1].replace("_", "-"), []) if isinstance(shown, tuple) else (OPENING, "error", [shown])
    for ending, shown in PLAIN.items()
}


class AppFailed(Exception):
    pass


def app() -> FastAPI:
    api = FastAPI()

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        model = (await request.json())["model"]
        deltas, how = ANSWERS[model]

        async def body() -> AsyncIterator[bytes]:
            yield CHAT.role()
            for delta in deltas:
                yield CHAT.content(delta)
            if how == "stall":
                await anyio.sleep(30)
            elif how == "raise":
                raise AppFailed("the model server went away")
            elif how == "done":
                yield CHAT.finish("stop")
                yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    encoding = get_encoding("o200k_base")
    rules = [
        BoundRule("keys", BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"]), Action.REDACT),
        BoundRule("codename", BannedPatterns(phrases=["project starlight"]), Action.ABORT),
        BoundRule(
            "nightfall",
            BannedPatterns(phrases=["project nightfall"]),
            Action.FALLBACK,
            fallback=Fallback("sorry", text=SORRY),
        ),
        BoundRule("budget", TokenBudget(encoding, max_tokens=BUDGET), Action.ABORT),
        BoundRule("idle", IdleTimeout(0.5), Action.ABORT),
    ]
    api.add_middleware(GuardrailMiddleware, rules=RuleSet.from_rules(rules))
    return api


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_in_thread(app()) as url:
        yield url


def _shown(error: Exception) -> str:
    code = getattr(error, "code", None)
    return f"{type(error).__name__}({code})" if code else type(error).__name__


def read_sync(base_url: str, model: str) -> object:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0, timeout=20) as client:
        try:
            chunks = list(
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], stream=True)
            )
        except openai.APIError as error:
            return _shown(error)
    text = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
    reasons = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    return (text, reasons[-1] if reasons else None)


def read_async(base_url: str, model: str) -> object:
    async def read() -> object:
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0, timeout=20) as client:
            try:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}], stream=True
                )
                chunks = [chunk async for chunk in stream]
            except openai.APIError as error:
                return _shown(error)
        text = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
        reasons = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
        return (text, reasons[-1] if reasons else None)

    return asyncio.run(read())


def read_helper(base_url: str, model: str) -> object:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0, timeout=20) as client:
        try:
            with client.chat.completions.stream(model=model, messages=[{"role": "user", "content": "hi"}]) as stream:
                for _ in stream:
                    pass
                final = stream.get_final_completion()
        except (openai.APIError, openai.OpenAIError) as error:
            return _shown(error)
    choice = final.choices[0]
    return (choice.message.content or "", choice.finish_reason)


@pytest.mark.parametrize("ending", list(ANSWERS))
def test_the_python_clients_see_what_the_matrix_says(base_url: str, ending: str) -> None:
    assert read_sync(base_url, ending) == PLAIN[ending], "openai, sync"
    assert read_async(base_url, ending) == PLAIN[ending], "openai, async"
    assert read_helper(base_url, ending) == HELPER[ending], "openai, .stream() helper"


OPENAI_1 = "openai<2"  # the last 1.x, beside the latest major this environment has


@pytest.fixture(scope="session")
def openai_1() -> Path:
    """A folder with the newest openai 1.x in it (installed once with pip), or a skip saying why not."""
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "guardrail-tests" / "openai-1"
    if not (folder / "openai" / "__init__.py").exists():
        install = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(folder), "--no-deps"]
        done = subprocess.run([*install, OPENAI_1, "distro", "tqdm"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.skip(f"pip could not install {OPENAI_1}: {done.stderr.strip()[-300:]}")
    return folder


def test_openai_python_1x_sees_what_the_matrix_says(base_url: str, openai_1: Path) -> None:
    # In a process of its own, openai 1.x first on the path (its dependencies are this environment's).
    script = (
        "import json, sys, openai\n"
        "from tests.test_client_matrix import ANSWERS, read_helper, read_sync\n"
        "seen = {e: [read_sync(sys.argv[1], e), read_helper(sys.argv[1], e)] for e in ANSWERS}\n"
        "print(json.dumps({'version': openai.__version__, 'seen': seen}))\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(openai_1), str(root)])}
    done = subprocess.run(
        [sys.executable, "-c", script, base_url], capture_output=True, text=True, timeout=120, env=env, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"].startswith("1.")
    for ending, (plain, helper) in result["seen"].items():
        assert plain == (list(PLAIN[ending]) if isinstance(PLAIN[ending], tuple) else PLAIN[ending]), ending
        assert helper == (list(HELPER[ending]) if isinstance(HELPER[ending], tuple) else HELPER[ending]), ending


def node_packages(folder: str, packages: tuple[str, ...], script: Path) -> Path:
    """A cache folder with ``packages`` installed from the registry and ``script`` in it, or a skip."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node and npm are not on this machine: the Node clients cannot run")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "guardrail-tests" / folder
    stamp = cache / "installed.txt"
    if not stamp.exists() or stamp.read_text() != " ".join(packages):
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "package.json").write_text('{"private": true, "type": "module"}\n')
        install = [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", *packages]
        done = subprocess.run(install, cwd=cache, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.skip(f"npm could not install {' '.join(packages)}: {done.stderr.strip()[-300:]}")
        stamp.write_text(" ".join(packages))
    shutil.copy(script, cache / script.name)
    return cache


def run_node(folder: Path, script: Path, base_url: str) -> dict[str, object]:
    command = ["node", script.name, f"{base_url}/v1", *ANSWERS]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=120, check=True)
    seen: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return seen


def test_the_openai_node_sdk_sees_what_the_matrix_says(base_url: str) -> None:
    folder = node_packages(NODE_OPENAI, (NODE_OPENAI,), NODE_SCRIPT)
    expected = {ending: list(shown) if isinstance(shown, tuple) else shown for ending, shown in PLAIN.items()}
    assert run_node(folder, NODE_SCRIPT, base_url) == expected


def test_the_vercel_ai_sdk_sees_what_the_matrix_says(base_url: str) -> None:
    folder = node_packages("ai-sdk-openai", AI_SDK, AI_SDK_SCRIPT)
    seen = run_node(folder, AI_SDK_SCRIPT, base_url)
    for ending, (text, finish, errors) in AI_SDK_SEEN.items():
        got_text, got_finish, got_errors = cast(list[Any], seen[ending])
        assert (got_text, got_finish) == (text, finish), ending
        codes = [error.split("(")[1].rstrip(")") for error in errors]
        assert len(got_errors) == len(codes) and all(
            f"(code: {c})" in e for c, e in zip(codes, got_errors, strict=True)
        )
