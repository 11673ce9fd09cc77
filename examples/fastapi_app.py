"""A FastAPI app that streams chat completions from an OpenAI-compatible server, guarded.

    UPSTREAM=http://127.0.0.1:8000/v1 uvicorn examples.fastapi_app:app --port 9000

(With `make run` serving the demo model on port 8000, this app proxies it on port 9000, with its
own guard in front.) When the guard ends a stream early, it cancels the endpoint's generator:
the `async with` below closes the upstream response, so the upstream model stops generating.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from guardrail import GuardrailMiddleware

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:8000/v1")

app = FastAPI()
app.add_middleware(GuardrailMiddleware, rules="rules/default.yaml")
client = httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10))


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> StreamingResponse:
    body = await request.body()
    headers = {"content-type": "application/json"}
    if "authorization" in request.headers:
        headers["authorization"] = request.headers["authorization"]

    async def relay() -> AsyncIterator[bytes]:
        async with client.stream("POST", f"{UPSTREAM}/chat/completions", content=body, headers=headers) as upstream:
            async for chunk in upstream.aiter_raw():
                yield chunk

    return StreamingResponse(relay(), media_type="text/event-stream")
