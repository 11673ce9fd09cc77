"""The guarded request's body: read once before the app runs, then replayed to it unchanged.

The guard needs the request before the answer starts: to count prompt tokens (and refuse an
over-budget prompt before the app runs), to know whether the client asked for a stream and for
usage, and to re-send the request to a fallback upstream. Chat requests are small, so the body
is read up front; the app then receives exactly the messages the server sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from guardrail._types import Message, Receive

# Bodies up to this size are kept for the guard; a larger one (say, many base64 images) is
# passed to the app untouched and the guard works without it: no prompt count, no replay.
MAX_REQUEST_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What the guard knows of the request: its body (if kept) and the flags it reads from it."""

    body: bytes | None = None
    payload: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def stream(self) -> bool:
        return bool(self.payload and self.payload.get("stream") is True)

    @property
    def include_usage(self) -> bool:
        options = self.payload.get("stream_options") if self.payload else None
        return isinstance(options, dict) and options.get("include_usage") is True

    @property
    def model(self) -> str | None:
        model = self.payload.get("model") if self.payload else None
        return model if isinstance(model, str) else None


async def read_request(receive: Receive) -> tuple[ChatRequest, list[Message], bool]:
    """Read the body from ``receive``, keeping up to :data:`MAX_REQUEST_BYTES`.

    Returns:
        The request as the guard sees it; the messages read, for the app to receive first; and
        whether they are all there is (the whole body, or a disconnect) so that the guard may
        take over ``receive`` to listen for the client going away.
    """
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return ChatRequest(), messages, True  # a disconnect: the app will see it too
        size += len(message.get("body", b""))
        if size > MAX_REQUEST_BYTES:
            return ChatRequest(), messages, False
        if not message.get("more_body", False):
            break
    body = b"".join(m.get("body", b"") for m in messages)
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    return ChatRequest(body, payload if isinstance(payload, dict) else None), messages, True
