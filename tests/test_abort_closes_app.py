"""An abort stops the app in middleware mode: the README's example app, relaying a real upstream.

The upstream streams the key at once and then keeps generating; every answer is aborted by the
guard. Each aborted answer's upstream stream must be closed within a second (the upstream's
generator sees it), and after a run of aborts longer than the example's connection pool,
ordinary requests still get their answer.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from types import ModuleType

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from tests.apps import ChatChunks
from tests.servers import serve_in_thread

KEY = "sk-" + "Zq9Xw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe"
ABORTS = 150  # more than the example client's pool of 100 connections
CLOSE_BOUND_SECONDS = 1.0


class Upstream:
    """Streams ``Hello`` (or the key, then endless text) and notes when each stream was closed."""

    def __init__(self) -> None:
        self.closed_at: list[float] = []
        self.lock = threading.Lock()

    async def completions(self, request: Request) -> StreamingResponse:
        ask = (await request.json())["messages"][-1]["content"]
        chunks = ChatChunks()

        async def body() -> AsyncIterator[bytes]:
            try:
                if ask == "hello":
                    for event in chunks.stream(["Hello", " there."]):
                        yield event
                    return
                yield chunks.role() + chunks.content(f"The key is {KEY} and more") * 2
                while True:
                    await anyio.sleep(0.001)
                    yield chunks.content(" and more") * 50
            finally:
                with self.lock:
                    self.closed_at.append(time.monotonic())

        return StreamingResponse(body(), media_type="text/event-stream")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.completions, methods=["POST"])])


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Upstream]]:
    upstream = Upstream()
    with serve_in_thread(upstream.app()) as upstream_url:
        monkeypatch.setenv("UPSTREAM", f"{upstream_url}/v1")
        module = _fresh_import("examples.fastapi_app")
        with serve_in_thread(module.app) as base_url:
            yield base_url, upstream


def _fresh_import(name: str) -> ModuleType:
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def ask(client: httpx.Client, base_url: str, text: str) -> str:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": text}]}
    response = client.post(f"{base_url}/v1/chat/completions", json=body, timeout=10)
    return response.text


# The example keeps one module-level httpx client for the app's life, never closed: its pooled
# connections are still open when the test's server thread stops.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_aborted_answers_close_their_upstream_stream_and_the_app_keeps_serving(example: tuple[str, Upstream]) -> None:
    base_url, upstream = example
    with httpx.Client() as client:
        for number in range(ABORTS):
            aborted_at = time.monotonic()
            text = ask(client, base_url, "key please")
            compact = text.replace(" ", "")
            # default.yaml redacts the key; its completion budget then ends the endless answer.
            assert '"finish_reason":"length"' in compact or '"finish_reason":"content_filter"' in compact
            assert KEY not in text
            deadline = time.monotonic() + 5
            while len(upstream.closed_at) <= number and time.monotonic() < deadline:
                time.sleep(0.001)
            assert len(upstream.closed_at) > number, f"abort {number}: the upstream stream was never closed"
            assert upstream.closed_at[number] - aborted_at < CLOSE_BOUND_SECONDS + 1, number
        assert "Hello" in ask(client, base_url, "hello")
