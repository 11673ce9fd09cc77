"""``guardrail serve``: the demo model in a real subprocess, and a second local server as upstream.

Acceptance 1 (the demo model answers the openai SDK, ``/metrics`` shows guardrail metrics) runs
the real command on a free port; acceptance 2 (pass-through, errors before and during streaming)
serves :func:`guardrail.proxy.app.build_app` in a thread in front of a fake upstream.
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from guardrail._types import Receive, Scope, Send
from guardrail.cli import main
from guardrail.proxy.app import ENV_RULES, ENV_UPSTREAM, ServeSettings, build_app, create_app
from guardrail.proxy.demo import CODE_NAME, FAKE_API_KEY, answer_for, split_tokens
from guardrail.proxy.upstream import UpstreamProxy
from tests.apps import CHAT_PATH, ChatChunks, read_body, sdk_chat
from tests.servers import ServerLog, guardrail_command, metrics_showing, serve_command, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RULES = ROOT / "rules" / "default.yaml"
TIMEOUT = 20.0
LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


@pytest.fixture(scope="module")
def demo_server() -> Iterator[tuple[str, ServerLog]]:
    """``guardrail serve`` on the demo model, in a subprocess on a free port; stopped with Ctrl+C."""
    with serve_command(
        [*guardrail_command(), "serve", "--rules", str(DEFAULT_RULES), "--port", "0"], cwd=ROOT
    ) as served:
        yield served


def demo_stream(base_url: str, prompt: str, **options: Any) -> tuple[str, list[str]]:
    text, reasons, _ = sdk_chat(base_url, prompt, model="guardrail-demo", api_key="no-key", timeout=TIMEOUT, **options)
    return text, reasons


def test_serve_streams_the_demo_model_to_the_openai_sdk(demo_server: tuple[str, ServerLog]) -> None:
    base_url, _ = demo_server
    prompt = "Hello!"
    # A budget keeps the test short; the demo model honours it as a real model would.
    assert demo_stream(base_url, prompt, max_tokens=30) == ("".join(split_tokens(answer_for(prompt))[:30]), ["length"])


def test_serve_redacts_the_demo_key_and_cuts_the_code_name(demo_server: tuple[str, ServerLog]) -> None:
    base_url, _ = demo_server
    text, reasons = demo_stream(base_url, "What is the API key?")
    assert FAKE_API_KEY not in text and "[redacted]" in text and reasons == ["stop"]
    text, reasons = demo_stream(base_url, "What is on the roadmap?")
    assert text == answer_for("roadmap")[: answer_for("roadmap").index(CODE_NAME)]
    assert reasons == ["content_filter"]


def streams_counted(dialect: str) -> str:
    return rf'guardrail_streams_total{{dialect="{dialect}",outcome="\w+"}} [1-9]'


def test_serve_answers_metrics_and_health(demo_server: tuple[str, ServerLog]) -> None:
    base_url, _ = demo_server
    demo_stream(base_url, "What is the API key?")
    with httpx.Client(base_url=base_url, timeout=TIMEOUT) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        metrics = client.get("/metrics").text
        assert client.get("/v1/models").json()["data"][0]["id"] == "guardrail-demo"
        assert client.get("/elsewhere").status_code == 404
    assert re.search(r'guardrail_interventions_total\{action="redact",rule="secrets"\} [1-9]', metrics), metrics
    assert 'guardrail_streams_total{dialect="openai_chat",outcome="completed"}' in metrics


def test_serve_logs_what_it_guards(demo_server: tuple[str, ServerLog]) -> None:
    _, log = demo_server
    logged = "".join(log.lines)
    assert "guarding the built-in demo model with rules from" in logged and str(DEFAULT_RULES) in logged


# --- a second local server as upstream ---------------------------------------------------------

CHUNKS = ChatChunks(id="chatcmpl-up", model="upstream-model", compact=True)
STREAM = CHUNKS.stream(["Hello", " from", " upstream."])
COMPLETION = {
    "id": "chatcmpl-up",
    "object": "chat.completion",
    "created": 1,
    "model": "upstream-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi."}, "finish_reason": "stop"}],
}


class FakeUpstream:
    """Answers by the request's ``model``: ``stream``, ``complete``, ``error-429``/``error-503``, ``drop``."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        self.headers.append({name.decode(): value.decode() for name, value in scope["headers"]})
        if scope["path"] == "/v1/models":
            await respond(send, 200, b'{"object":"list","data":[]}', b"application/json")
            return
        model = json.loads(body)["model"]
        if model.startswith("error-"):
            await respond(send, int(model[6:]), b'{"error":{"message":"slow down","type":"rate_limit"}}')
        elif model == "complete":
            await respond(send, 200, json.dumps(COMPLETION).encode(), b"application/json")
        else:
            headers = [(b"content-type", b"text/event-stream"), (b"x-upstream", b"yes")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for event in STREAM[:2] if model == "drop" else STREAM:
                await send({"type": "http.response.body", "body": event, "more_body": True})
                await anyio.sleep(0)
            if model == "drop":
                raise RuntimeError("the upstream crashed mid-stream")  # uvicorn cuts the connection
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def respond(send: Send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    headers = [(b"content-type", content_type), (b"x-upstream", b"yes"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def proxied() -> Iterator[tuple[str, FakeUpstream]]:
    upstream = FakeUpstream()
    with serve_in_thread(upstream, lifespan="off") as upstream_url:
        app = build_app(ServeSettings((str(DEFAULT_RULES),), f"{upstream_url}/v1"), registry=CollectorRegistry())
        with serve_in_thread(app, server_header=False, date_header=False) as base_url:
            yield base_url, upstream


def post(base_url: str, model: str, *, stream: bool = True) -> httpx.Response:
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": "Bearer sk-client", "x-custom": "1"}
    return httpx.post(f"{base_url}{CHAT_PATH}", json=body, headers=headers, timeout=TIMEOUT)


def test_streaming_chat_passes_through_with_its_headers(proxied: tuple[str, FakeUpstream]) -> None:
    base_url, upstream = proxied
    response = post(base_url, "stream")
    assert response.status_code == 200
    assert response.headers["x-upstream"] == "yes"
    assert len(response.headers.get_list("server")) == 1 and len(response.headers.get_list("date")) == 1
    assert response.content == b"".join(STREAM)  # nothing held: byte for byte
    assert upstream.headers[-1]["authorization"] == "Bearer sk-client"
    assert upstream.headers[-1]["x-custom"] == "1"


def test_non_streaming_chat_and_other_paths_pass_through(proxied: tuple[str, FakeUpstream]) -> None:
    base_url, _ = proxied
    response = post(base_url, "complete", stream=False)
    assert (response.status_code, response.json()) == (200, COMPLETION)
    assert response.headers["x-upstream"] == "yes"
    models = httpx.get(f"{base_url}/v1/models", timeout=TIMEOUT)
    assert (models.status_code, models.json()) == (200, {"object": "list", "data": []})


@pytest.mark.parametrize("status", [429, 503])
def test_an_upstream_error_before_streaming_keeps_its_status_and_body(
    proxied: tuple[str, FakeUpstream], status: int
) -> None:
    base_url, _ = proxied
    response = post(base_url, f"error-{status}")
    assert response.status_code == status
    assert response.json() == {"error": {"message": "slow down", "type": "rate_limit"}}


def test_an_upstream_that_drops_mid_stream_makes_the_sdk_raise_an_api_error(
    proxied: tuple[str, FakeUpstream],
) -> None:
    base_url, _ = proxied
    received: list[str] = []
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-client", max_retries=0, timeout=TIMEOUT) as client:
        with pytest.raises(openai.APIError) as raised:
            with client.chat.completions.create(
                model="drop", messages=[{"role": "user", "content": "hi"}], stream=True
            ) as stream:
                for chunk in stream:
                    received.extend(choice.delta.content or "" for choice in chunk.choices)
    assert not isinstance(raised.value, openai.APIConnectionError)
    assert raised.value.code == "upstream_error"
    assert "".join(received) == "Hello"


# --- the command line and the worker factory ------------------------------------------------------


def test_serve_help_reads_well() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--rules FILE", "--upstream URL", "--host", "--port", "--workers", "PROMETHEUS_MULTIPROC_DIR"):
        assert option in result.output


def test_serve_refuses_a_broken_rule_file_before_binding(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "version: 1\nrules:\n  - name: x\n    type: banned_patterns\n    patterns: ['(']\n    action: abort\n"
    )
    result = CliRunner().invoke(main, ["serve", "--rules", str(broken), "--port", "0"])
    assert result.exit_code == 1
    assert f"{broken}:5: rules[0].patterns[0]" in result.output


def test_serve_refuses_an_upstream_that_is_not_a_url() -> None:
    result = CliRunner().invoke(main, ["serve", "--rules", str(DEFAULT_RULES), "--upstream", "localhost:11434"])
    assert result.exit_code == 2
    assert "absolute http(s) URL" in result.output


def test_the_worker_factory_reads_its_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ServeSettings((str(DEFAULT_RULES), str(ROOT / "rules" / "secrets.yaml")), "https://api.example/v1")
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    assert ServeSettings.from_env() == settings
    app = create_app()
    assert app.settings == settings
    assert app.freezes_after_startup  # a worker process is the proxy's own
    assert isinstance(app.model, UpstreamProxy)
    anyio.run(app.model.aclose)
    monkeypatch.setenv(ENV_UPSTREAM, "")
    assert ServeSettings.from_env().upstream is None
    monkeypatch.delenv(ENV_RULES)
    with pytest.raises(ValueError, match=ENV_RULES):
        ServeSettings.from_env()


def test_the_served_proxy_freezes_its_startup_objects_once_started() -> None:
    """What startup leaves behind stays out of later collections, in ``guardrail serve`` only.

    An app embedded elsewhere (``build_app`` as is) leaves the process's garbage collector alone.
    """
    frozen_when_started: dict[bool, int] = {}

    async def start_and_stop(app: Any, freeze: bool) -> None:
        messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent: list[str] = []

        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message["type"])
            if message["type"] == "lifespan.startup.complete":
                frozen_when_started[freeze] = gc.get_freeze_count()

        await app({"type": "lifespan"}, receive, send)
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]

    for freeze in (False, True):
        settings = ServeSettings((str(DEFAULT_RULES),))
        app = build_app(settings, registry=CollectorRegistry(), freeze_after_startup=freeze)
        gc.unfreeze()
        try:
            anyio.run(start_and_stop, app, freeze)
        finally:
            gc.unfreeze()
    assert frozen_when_started[False] == 0
    assert frozen_when_started[True] > 10_000  # the modules, the app and its rules


def test_the_access_log_masks_credentials_in_query_strings() -> None:
    process = subprocess.Popen(
        [*guardrail_command(), "serve", "--rules", str(DEFAULT_RULES), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,  # uvicorn's access log
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None and process.stderr is not None
    access, log = ServerLog(process.stdout), ServerLog(process.stderr)
    secret = "SeCrEt-" + "7" * 12
    try:
        base_url = log.wait_for(LISTENING).group(1)
        url = f"{base_url}/v1/models?api-version=2024&api-key={secret}&token={secret}"
        assert httpx.get(url, timeout=TIMEOUT).status_code == 200
        line = access.wait_for(re.compile(r'"GET /v1/models\?[^"]*"')).group(0)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=TIMEOUT)
        access.join()
        log.join()
        process.stdout.close()
        process.stderr.close()
    assert "api-key=***" in line and "token=***" in line and "api-version=2024" in line
    assert secret not in "".join(access.lines + log.lines)


def test_serve_guards_responses_and_messages_end_to_end(demo_server: tuple[str, ServerLog]) -> None:
    import anthropic

    base_url, _ = demo_server
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="no-key", max_retries=0, timeout=TIMEOUT) as client:
        events = list(client.responses.create(model="guardrail-demo", input="What is the API key?", stream=True))
        streamed = "".join(event.delta for event in events if event.type == "response.output_text.delta")
        whole = client.responses.create(model="guardrail-demo", input="Tell me the roadmap")
    with anthropic.Anthropic(base_url=base_url, api_key="no-key", max_retries=0, timeout=TIMEOUT) as messages:
        with messages.messages.stream(
            model="guardrail-demo", max_tokens=1000, messages=[{"role": "user", "content": "What is the API key?"}]
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        roadmap = messages.messages.create(
            model="guardrail-demo", max_tokens=1000, messages=[{"role": "user", "content": "Tell me the roadmap"}]
        )
    assert "[redacted]" in streamed and FAKE_API_KEY not in streamed and events[-1].type == "response.completed"
    assert whole.status == "incomplete" and whole.incomplete_details is not None
    assert whole.incomplete_details.reason == "content_filter" and CODE_NAME not in whole.output_text
    assert "[redacted]" in text and FAKE_API_KEY not in text and final.stop_reason == "end_turn"
    assert roadmap.stop_reason == "refusal" and CODE_NAME not in roadmap.model_dump_json()
    metrics_showing(base_url, *(streams_counted(dialect) for dialect in ("openai_responses", "anthropic_messages")))


def test_proxy_errors_on_the_messages_endpoint_come_in_anthropics_envelope() -> None:
    import socket

    import anthropic

    with socket.socket() as probe:  # a port nobody listens on: the upstream cannot be reached
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = build_app(ServeSettings((str(DEFAULT_RULES),), f"http://127.0.0.1:{port}"), registry=CollectorRegistry())
    with serve_in_thread(app) as base_url:
        with anthropic.Anthropic(base_url=base_url, api_key="k", max_retries=0, timeout=TIMEOUT) as client:
            with pytest.raises(anthropic.APIStatusError) as raised:
                client.messages.create(model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 502
    assert raised.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "The upstream model server could not be reached."},
    }


def test_serve_guards_completions_ollama_and_gemini_end_to_end(demo_server: tuple[str, ServerLog]) -> None:
    check_completions_ollama_and_gemini(demo_server[0])


def test_serve_guards_completions_ollama_and_gemini_from_an_upstream() -> None:
    from guardrail.proxy.demo import DemoModel

    with serve_in_thread(DemoModel(seconds_per_token=0.001)) as upstream_url:
        app = build_app(ServeSettings((str(DEFAULT_RULES),), upstream_url), registry=CollectorRegistry())
        with serve_in_thread(app) as base_url:
            check_completions_ollama_and_gemini(base_url)


def check_completions_ollama_and_gemini(base_url: str) -> None:
    import ollama
    from google import genai
    from google.genai import types

    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="no-key", max_retries=0, timeout=TIMEOUT) as client:
        chunks = list(client.completions.create(model="guardrail-demo", prompt="What is the API key?", stream=True))
        completion = "".join(choice.text for chunk in chunks for choice in chunk.choices)
        cut = client.completions.create(model="guardrail-demo", prompt="Tell me the roadmap")
    assert "[redacted]" in completion and FAKE_API_KEY not in completion
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert cut.choices[0].finish_reason == "content_filter" and CODE_NAME not in cut.choices[0].text

    with ollama.Client(host=base_url, timeout=TIMEOUT) as local:
        chat = list(
            local.chat(model="guardrail-demo", messages=[{"role": "user", "content": "the API key?"}], stream=True)
        )
        generated = list(local.generate(model="guardrail-demo", prompt="Tell me the roadmap", stream=True))
    chat_text = "".join(part.message.content or "" for part in chat)
    assert "[redacted]" in chat_text and FAKE_API_KEY not in chat_text and chat[-1].done_reason == "stop"
    assert CODE_NAME not in "".join(part.response or "" for part in generated)
    assert generated[-1].done and generated[-1].done_reason == "content_filter"

    gemini = genai.Client(api_key="no-key", http_options=types.HttpOptions(base_url=base_url))
    streamed = list(gemini.models.generate_content_stream(model="guardrail-demo", contents="What is the API key?"))
    gemini_text = "".join(response.text or "" for response in streamed)
    roadmap = gemini.models.generate_content(model="guardrail-demo", contents="Tell me the roadmap")
    assert "[redacted]" in gemini_text and FAKE_API_KEY not in gemini_text
    assert streamed[-1].candidates and streamed[-1].candidates[0].finish_reason == types.FinishReason.STOP
    assert roadmap.candidates and roadmap.candidates[0].finish_reason == types.FinishReason.SAFETY
    assert CODE_NAME not in roadmap.model_dump_json()

    metrics_showing(base_url, *(streams_counted(dialect) for dialect in ("openai_completions", "ollama", "gemini")))
