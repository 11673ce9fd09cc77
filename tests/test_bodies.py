"""Every kind of body on a guarded path, through a real server: guarded or refused, never passed unread.

Encoded (gzip, deflate, br) and mislabelled event streams are read and guarded; plain text is
guarded as one channel; legacy completions are read by the openai SDK; what the guard cannot
read is refused with a 502 unless the rule file passes it on purpose.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import AsyncIterator, Callable, Iterator

import brotli
import httpx
import openai
import pytest
from fastapi import FastAPI
from starlette.responses import Response, StreamingResponse

from guardrail.asgi import GuardrailMiddleware
from guardrail.config import RuleSet
from guardrail.config.ruleset import RuleGroup
from guardrail.core.rule import Action, BoundRule
from guardrail.rules.banned import BannedPatterns
from tests.apps import ChatChunks
from tests.servers import serve_in_thread

KEY = "sk-" + "Zq9Xw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe"
DELTAS = ["Your key is ", KEY[:10], KEY[10:], " ok."]
RULE = BoundRule("keys", BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"]), Action.REDACT)
ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
}


def ruleset(*, pass_unreadable: tuple[str, ...] = ()) -> RuleSet:
    return RuleSet((RuleGroup("", ("/v1/*",), "o200k_base", (RULE,), pass_unreadable=pass_unreadable),))


def served(app: FastAPI, rules: RuleSet) -> Iterator[str]:
    app.add_middleware(GuardrailMiddleware, rules=rules)
    with serve_in_thread(app) as base_url:
        yield base_url


def streaming(body: list[bytes], media_type: str, headers: dict[str, str] | None = None) -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in body:
            yield chunk

    return StreamingResponse(chunks(), media_type=media_type, headers=headers)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = FastAPI()
    events = b"".join(ChatChunks().stream(DELTAS))

    @app.post("/v1/chat/completions")
    async def chat(encoding: str = "", label: str = "text/event-stream") -> Response:
        if encoding:
            data = ENCODERS[encoding](events)
            return streaming([data[:10], data[10:]], label, {"content-encoding": encoding})
        return streaming([events[:30], events[30:]], label)

    @app.post("/v1/completions")
    async def completions() -> StreamingResponse:
        chunks = [
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1,
                "model": "m",
                "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}],
            }
            for piece in DELTAS
        ]
        body = [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks] + [b"data: [DONE]\n\n"]
        return streaming(body, "text/event-stream")

    @app.post("/v1/text")
    async def text() -> StreamingResponse:
        return streaming([piece.encode() for piece in DELTAS], "text/plain")

    @app.post("/v1/ndjson")
    async def ndjson() -> StreamingResponse:
        return streaming([json.dumps({"response": piece}).encode() + b"\n" for piece in DELTAS], "application/x-ndjson")

    @app.post("/v1/binary")
    async def binary() -> Response:
        return Response(KEY.encode(), media_type="application/octet-stream")

    yield from served(app, ruleset())


def post(base_url: str, path: str, **params: str) -> httpx.Response:
    return httpx.post(
        f"{base_url}{path}", params=params, json={"model": "m", "stream": True, "messages": []}, timeout=10
    )


@pytest.mark.parametrize("encoding", list(ENCODERS))
def test_an_encoded_stream_is_decoded_and_guarded(base_url: str, encoding: str) -> None:
    response = post(base_url, "/v1/chat/completions", encoding=encoding)
    assert "content-encoding" not in response.headers
    assert KEY not in response.text and "[redacted]" in response.text


@pytest.mark.parametrize(
    "label", ["application/json", "text/plain", "application/x-ndjson", "application/octet-stream"]
)
def test_a_mislabelled_event_stream_is_guarded_or_refused(base_url: str, label: str) -> None:
    response = post(base_url, "/v1/chat/completions", label=label)
    assert KEY not in response.text
    assert "[redacted]" in response.text or response.status_code == 502


def test_the_openai_sdk_reads_guarded_legacy_completions(base_url: str) -> None:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0, timeout=10) as client:
        chunks = list(client.completions.create(model="m", prompt="hi", stream=True))
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == "Your key is [redacted] ok."


def test_plain_text_is_guarded_as_one_channel(base_url: str) -> None:
    response = post(base_url, "/v1/text")
    assert response.text == "Your key is [redacted] ok."


@pytest.mark.parametrize("path", ["/v1/ndjson", "/v1/binary"])
def test_what_the_guard_cannot_read_is_refused(base_url: str, path: str) -> None:
    response = post(base_url, path)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "unreadable_response"
    assert KEY not in response.text


def test_the_rule_file_can_pass_unreadable_answers_on_purpose() -> None:
    app = FastAPI()

    @app.post("/v1/binary")
    async def binary() -> Response:
        return Response(b"\x00\x01 opaque", media_type="application/octet-stream")

    for url in served(app, ruleset(pass_unreadable=("/v1/binary",))):
        response = post(url, "/v1/binary")
        assert (response.status_code, response.content) == (200, b"\x00\x01 opaque")
