"""Each way banned text once reached a client, through a real uvicorn server and the openai SDK.

The app streams exactly the events an attacker or an ordinary server would send; the guard
runs ``rules/default.yaml`` (plus a 1,024-token budget for the finish-chunk case). The client is
the official SDK: everything it hands the application (every chunk, joined per field) and any
error it raises must be free of the key, the code name and the private key.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from starlette.responses import StreamingResponse

from guardrail.asgi import GuardrailMiddleware
from guardrail.config import load_rules
from guardrail.core.rule import Action, BoundRule
from guardrail.rules.budget import TokenBudget
from guardrail.tokenizers import get_encoding
from tests import leakgrammar
from tests.servers import serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-proj-" + "Zq9Xw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe"
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n"
    "-----END RSA PRIVATE KEY-----"
)
SECRETS = (KEY[8:20], "starlight", "MIIBOgIBAAJBAKj34Gkx", "비밀번호")
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def event(obj: object) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def chunk(delta: dict[str, Any], finish: str | None = None, **choice: Any) -> bytes:
    return event({**HEAD, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **choice}]})


DONE = b"data: [DONE]\n\n"


def split(text: str, size: int = 5) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def logprobs(text: str) -> dict[str, Any]:
    return {"content": [{"token": text, "logprob": -0.1, "bytes": list(text.encode()), "top_logprobs": []}]}


LEAKS: dict[str, list[bytes]] = {
    "whole answer on the finish chunk": [chunk({"content": f"Your key is {KEY}."}, "stop"), DONE],
    "last token with finish_reason (vLLM)": [
        *(chunk({"content": piece}) for piece in split(f"Key: {KEY[:-4]}")),
        chunk({"content": KEY[-4:]}, "stop"),
        DONE,
    ],
    'finish_reason "" on every chunk': [*(chunk({"content": p}, "") for p in split(f"Key {KEY} ok")), DONE],
    "reasoning_content": [*(chunk({"reasoning_content": p}) for p in split(f"Think: {KEY}")), DONE],
    "reasoning": [*(chunk({"reasoning": p}) for p in split("It is Project Starlight.")), DONE],
    "legacy function_call arguments": [
        *(chunk({"function_call": {"arguments": p}}) for p in split(json.dumps({"key": KEY}))),
        DONE,
    ],
    "audio transcript": [*(chunk({"audio": {"id": "a", "transcript": p}}) for p in split(f"say {KEY}")), DONE],
    "content as a list of parts": [
        *(chunk({"content": [{"type": "text", "text": p}]}) for p in split(f"key {KEY}")),
        DONE,
    ],
    "tool-call arguments as an object": [
        chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": {"k": KEY}}}
                ]
            }
        ),
        DONE,
    ],
    "tool-call name": [
        chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "project_x"}}]}),
        *(chunk({"tool_calls": [{"index": 0, "function": {"name": p}}]}) for p in split(f" {KEY}")),
        DONE,
    ],
    "logprobs of held text": [
        *(chunk({"content": p}, None, logprobs=logprobs(p)) for p in split(f"key {KEY} ok", 3)),
        DONE,
    ],
    "an error object's message": [
        chunk({"content": "Hi"}),
        event({"error": {"message": f"failed: {KEY}", "type": "x"}}),
    ],
    "data after [DONE]": [chunk({"content": "Hi"}), f"data: [DONE] {KEY}\n\n".encode()],
    "JSON that is not an object": [chunk({"content": "Hi"}), event(f"key {KEY}"), DONE],
    "an SSE comment": [f": {KEY}\n\n".encode(), chunk({"content": "Hi"}), DONE],
    "an id field": [f"id: {KEY}\n".encode() + chunk({"content": "Hi"}), DONE],
    "text after a finish continues its channel": [
        chunk({"content": f"key {KEY[:14]}"}, "stop"),
        chunk({"content": KEY[14:]}),
        DONE,
    ],
    "a key straight before a private key": [*(chunk({"content": p}) for p in split(f"x {KEY}{PEM} y", 7)), DONE],
    "a Korean phrase with a particle": [
        *(chunk({"content": p}) for p in split("관리자 비밀번호는 1234입니다", 2)),
        DONE,
    ],
}


def app_streaming(events: Sequence[bytes], rules: Any | None) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions() -> StreamingResponse:
        async def body() -> Any:
            for data in events:
                yield data

        return StreamingResponse(body(), media_type="text/event-stream")

    if rules is not None:
        app.add_middleware(GuardrailMiddleware, rules=rules)
    return app


def raw_view(base_url: str) -> list[str]:
    """The bytes on the wire as a client reads them: every JSON string decoded, each field joined."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=10)
    return leakgrammar.chat_client(response.content)


def client_view(base_url: str) -> tuple[list[str], Exception | None]:
    """Everything the SDK hands the application: every chunk's JSON, each field joined, any error."""
    seen: list[str] = []
    joined: dict[str, str] = {}
    error: Exception | None = None
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0, timeout=10) as client:
        try:
            stream = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            for item in stream:
                data = item.model_dump(mode="json", exclude_none=True, warnings=False)
                seen.append(json.dumps(data, ensure_ascii=False))
                for choice in data.get("choices", []):
                    for key, value in _leaves(choice.get("delta", {}), ""):
                        joined[key] = joined.get(key, "") + value
                    for entry in (choice.get("logprobs") or {}).get("content") or []:
                        joined["logprobs"] = joined.get("logprobs", "") + entry["token"]
        except openai.APIError as exc:
            error = exc
            seen.append(str(exc))
    return seen + list(joined.values()), error


def _leaves(value: Any, path: str) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        return [leaf for key, child in value.items() for leaf in _leaves(child, f"{path}.{key}")]
    if isinstance(value, list):
        return [leaf for child in value for leaf in _leaves(child, f"{path}[]")]
    return []


def leaked(strings: Sequence[str]) -> list[str]:
    return [secret for secret in SECRETS for text in strings if secret.lower() in text.lower()]


@pytest.mark.parametrize("name", list(LEAKS))
@pytest.mark.parametrize("action", [Action.REDACT, Action.ABORT])
def test_no_banned_text_reaches_the_sdk(name: str, action: Action) -> None:
    rules = load_rules(ROOT / "rules" / "default.yaml")
    bound = [
        BoundRule(
            rule.name, rule.rule, action if rule.action is not Action.LOG else rule.action, replacement="[redacted]"
        )
        for rule in rules.rules
    ]
    korean = BoundRule("korean", _korean(), action)
    ruleset = type(rules).from_rules([*bound, korean], paths=["/v1/*"])
    # The events are valid for the SDK (or an error it raises as APIError): nothing else may fail.
    events = LEAKS[name]
    with serve_in_thread(app_streaming(events, None)) as base_url:
        assert leaked(raw_view(base_url)), "unguarded, the case shows a secret"
    with serve_in_thread(app_streaming(events, ruleset)) as base_url:
        seen, error = client_view(base_url)
        seen += raw_view(base_url)
    assert leaked(seen) == [], seen
    if error is not None:
        assert isinstance(error, openai.APIError)


def _korean() -> Any:
    from guardrail.rules.banned import BannedPatterns

    return BannedPatterns(phrases=["비밀번호"])


def test_a_3000_token_answer_in_its_finish_chunk_is_cut_at_a_1024_token_budget() -> None:
    encoding = get_encoding("o200k_base")
    answer = " ".join(f"word{n}" for n in range(3000))
    assert len(encoding.encode_ordinary(answer)) >= 3000
    rule = BoundRule("budget", TokenBudget(encoding, max_tokens=1024), Action.ABORT)
    ruleset = load_rules(ROOT / "rules" / "default.yaml").from_rules([rule], paths=["/v1/*"])
    with serve_in_thread(app_streaming([chunk({"content": answer}, "stop"), DONE], ruleset)) as base_url:
        with openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0, timeout=10) as client:
            stream = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            chunks = list(stream)
    text = "".join(choice.delta.content or "" for item in chunks for choice in item.choices)
    reasons = [choice.finish_reason for item in chunks for choice in item.choices if choice.finish_reason]
    assert len(encoding.encode_ordinary(text)) == 1024
    assert answer.startswith(text)
    assert reasons == ["length"]


def test_json_nested_10000_deep_ends_the_stream_with_an_error_the_sdk_raises() -> None:
    deep = b"data: " + b"[" * 10_000 + b"]" * 10_000 + b"\n\n"
    ruleset = load_rules(ROOT / "rules" / "default.yaml")
    with serve_in_thread(app_streaming([chunk({"content": "Hi"}), deep, DONE], ruleset)) as base_url:
        seen, error = client_view(base_url)
    assert isinstance(error, openai.APIError)
    assert "malformed" in str(error) or "JSON" in str(error)


@pytest.mark.parametrize(
    "trick",
    [
        "proj\u200bect starlight",
        "project star\u00adlight",
        "ｐｒｏｊｅｃｔ ｓｔａｒｌｉｇｈｔ",
        "proje\u0301ct starlight",
    ],
)
def test_unicode_tricks_do_not_get_a_phrase_past_a_normalising_rule(trick: str) -> None:
    from guardrail.rules.banned import BannedPatterns

    rule = BoundRule("codename", BannedPatterns(phrases=["project starlight"], normalize=True), Action.REDACT)
    ruleset = load_rules(ROOT / "rules" / "default.yaml").from_rules([rule], paths=["/v1/*"])
    events = [*(chunk({"content": p}) for p in split(f"It is {trick}, ok.", 3)), DONE]
    with serve_in_thread(app_streaming(events, ruleset)) as base_url:
        with openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0, timeout=10) as client:
            stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            text = "".join(choice.delta.content or "" for item in stream for choice in item.choices)
    assert text == "It is [redacted], ok."
