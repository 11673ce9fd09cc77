"""Run an ASGI app under a real uvicorn server, in a background thread, for end-to-end tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.types import ASGIApp

# Generous: startup is milliseconds, but CI machines stall.
STARTUP_TIMEOUT_SECONDS = 10.0
# uvicorn waits this long for open responses at shutdown before cancelling their tasks, so a
# test that leaves a stream open cannot hang the suite.
GRACEFUL_SHUTDOWN_SECONDS = 5.0


@contextmanager
def serve_in_thread(app: ASGIApp, **config: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1, on a free port, until the block exits.

    The listening socket is bound before the server starts, so there is no race for the port.
    On exit the server shuts down gracefully (lifespan shutdown included) and the thread is
    joined, so no socket is left open.

    Args:
        app: the ASGI app to serve.
        **config: extra `uvicorn.Config` options, e.g. ``lifespan="off"``.

    Yields:
        The base URL, e.g. ``http://127.0.0.1:54321``.

    Raises:
        RuntimeError: the server did not start in time.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options: dict[str, Any] = {
        "log_config": None,  # leave the test process's logging configuration alone
        "access_log": False,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
        **config,
    }
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on port {port}")
            time.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
