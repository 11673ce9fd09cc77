"""Small ASGI pieces the shells share: whole responses, OpenAI's error envelope, lifespan."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from guardrail._types import Receive, Send


def openai_error(message: str, *, type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope: the SDKs raise their typed errors from it."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


async def send_response(
    send: Send, status: int, body: bytes, content_type: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """A whole response: status, headers with its length, and the body."""
    start_headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body)), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(send: Send, status: int, payload: object, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """``payload`` as a compact ASCII JSON response."""
    body = json.dumps(payload, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    await send_response(send, status, body, b"application/json", headers)


async def serve_lifespan(
    receive: Receive, send: Send, *, on_shutdown: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Answer a lifespan scope: nothing to start; ``on_shutdown`` runs before shutdown completes."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if on_shutdown is not None:
                await on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
