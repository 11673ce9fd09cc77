"""litellm as a client (an optional test dependency): its exceptions keep only the error's
message, so the guard's code must be in the message (issue: errors that keep their code)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import pytest
from fastapi import FastAPI
from starlette.responses import Response, StreamingResponse

from guardrail.asgi import GuardrailMiddleware
from guardrail.config import RuleSet
from guardrail.core.rule import Action, BoundRule
from guardrail.rules.timeout import IdleTimeout
from tests.apps import ChatChunks
from tests.servers import serve_in_thread

litellm = pytest.importorskip("litellm", reason="litellm is an optional test dependency: pip install litellm")

CHAT = ChatChunks()
# litellm's own imports warn (pydantic, its dependencies): not this project's warnings.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.mark.parametrize(
    ("ending", "code"),
    [("stall", "idle_timeout"), ("cut", "upstream_truncated")],
)
def test_litellm_sees_the_code_in_its_exception(ending: str, code: str) -> None:
    api = FastAPI()

    @api.post("/v1/chat/completions")
    async def chat() -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield CHAT.role()
            yield CHAT.content("Hello")
            if ending == "stall":
                await anyio.sleep(30)

        return StreamingResponse(body(), media_type="text/event-stream")

    rule = BoundRule("idle", IdleTimeout(0.5), Action.ABORT)
    api.add_middleware(GuardrailMiddleware, rules=RuleSet.from_rules([rule]))
    with serve_in_thread(api) as base_url:
        with pytest.raises(Exception) as raised:
            for _ in litellm.completion(
                model="openai/gpt-test",
                api_base=f"{base_url}/v1",
                api_key="k",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                num_retries=0,
            ):
                pass
    assert code in str(raised.value), json.dumps(str(raised.value))
