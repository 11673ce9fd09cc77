"""``guardrail serve --record DIR``: what the model sent, one file per stream, replayed as the live run went."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

from guardrail._types import Message, Receive, Scope, Send
from guardrail.cli import main
from guardrail.proxy.demo import CODE_NAME, FAKE_API_KEY, FAKE_SSN
from guardrail.proxy.record import StreamRecorder
from guardrail.replay import client_view
from tests.apps import CHAT_PATH, ChatChunks, sdk_chat
from tests.servers import ServerLog, guardrail_command, serve_command

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RULES = ROOT / "rules" / "default.yaml"
TIMEOUT = 30.0
# One prompt per action of rules/default.yaml that a recording can show (time limits need time).
PROMPTS = ["Show me an API key", "What is on the roadmap?", "Show me the customer record"]
CLIENT_KEY = "sk-client-" + "k" * 24


def live_records(log: ServerLog) -> dict[str, dict[str, Any]]:
    """The stream records the server logged (``guardrail.record``), by request id."""
    marker = "guardrail.record: "
    records = [json.loads(line.split(marker, 1)[1]) for line in log.lines if marker in line]
    return {record["request_id"]: record for record in records}


def test_a_recorded_stream_replays_with_the_hits_and_client_text_of_the_live_run(tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    command = [*guardrail_command(), "serve", "--rules", str(DEFAULT_RULES), "--port", "0", "--record", str(recordings)]
    live = {}
    with serve_command(command, cwd=tmp_path) as (base_url, log):
        for number, prompt in enumerate(PROMPTS):
            headers = {"x-request-id": f"stream-{number}"}
            live[number] = sdk_chat(
                base_url, prompt, model="guardrail-demo", api_key=CLIENT_KEY, timeout=TIMEOUT, extra_headers=headers
            )
    records = live_records(log)
    files = sorted(recordings.iterdir())
    assert [path.name.rsplit("-", 4)[1:] for path in files] == [
        [f"{number + 1:04d}", "v1", "chat", "completions.sse"] for number in range(len(PROMPTS))
    ]
    raw = [path.read_bytes() for path in files]
    sent = [client_view(data).text["choices[0].content"] for data in raw]  # as the model sent it
    assert FAKE_API_KEY in sent[0] and CODE_NAME in sent[1] and FAKE_SSN in sent[2]
    for data in raw:  # the model's answer only: no request, no headers
        assert b"stream-" not in data and CLIENT_KEY.encode() not in data
    for number, path in enumerate(files):
        replayed = CliRunner().invoke(main, ["replay", "--rules", str(DEFAULT_RULES), "--json", str(path)])
        assert replayed.exit_code == 0, replayed.output
        result = json.loads(replayed.output)
        record = records[f"stream-{number}"]
        assert [(hit["rule"], hit["action"], hit["channel"], hit["start"], hit["end"]) for hit in result["hits"]] == [
            (hit["rule"], hit["action"], hit["channel"], hit["start"], hit["end"]) for hit in record["hits"]
        ]
        assert result["hits"], "every prompt here makes a rule fire"
        assert result["client"]["text"] == {"choices[0].content": live[number].text}
        assert list(result["client"]["finish_reasons"].values()) == live[number].finish_reasons


def test_the_record_option_says_it_writes_model_text_to_disk() -> None:
    help_text = " ".join(CliRunner().invoke(main, ["serve", "--help"]).output.split())
    assert "--record DIR" in help_text
    assert "The files hold model text, including what the rules cut or redact" in help_text
    assert "Request headers are never written." in help_text


CHUNKS = ChatChunks(compact=True)
STREAM = CHUNKS.stream(["Hello", " there"])


def answering(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        half = len(body) // 2
        await send({"type": "http.response.body", "body": body[:half], "more_body": True})
        await send({"type": "http.response.body", "body": body[half:], "more_body": False})

    return app


async def call(app: Any) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await app({"type": "http", "method": "POST", "path": CHAT_PATH, "headers": []}, receive, send)
    return sent


@pytest.mark.anyio
async def test_an_encoded_answer_is_recorded_decoded_and_passed_on_unchanged(tmp_path: Path) -> None:
    body = gzip.compress(b"".join(STREAM))
    headers = [(b"content-type", b"text/event-stream"), (b"content-encoding", b"gzip")]
    sent = await call(StreamRecorder(answering(200, headers, body), tmp_path / "new"))
    (recorded,) = (tmp_path / "new").iterdir()
    assert recorded.suffix == ".sse" and recorded.read_bytes() == b"".join(STREAM)
    assert b"".join(message.get("body", b"") for message in sent) == body


@pytest.mark.anyio
async def test_error_answers_are_not_recorded(tmp_path: Path) -> None:
    error = b'{"error": {"message": "slow down"}}'
    await call(StreamRecorder(answering(429, [(b"content-type", b"application/json")], error), tmp_path))
    assert list(tmp_path.iterdir()) == []
