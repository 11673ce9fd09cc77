"""Real servers for end-to-end tests: an ASGI app under uvicorn in a thread, and the ``guardrail`` command."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import uvicorn
from starlette.types import ASGIApp

# Generous: startup is milliseconds, but CI machines stall.
STARTUP_TIMEOUT_SECONDS = 10.0
# uvicorn waits this long for open responses at shutdown before cancelling their tasks, so a
# test that leaves a stream open cannot hang the suite.
GRACEFUL_SHUTDOWN_SECONDS = 5.0
# A subprocess imports everything first; a loaded machine makes that slow.
SUBPROCESS_STARTUP_SECONDS = 60.0
# How long a `guardrail serve` subprocess may take to stop after Ctrl+C.
SUBPROCESS_STOP_SECONDS = 20.0
LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


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


def wait_for_records(records: Sequence[object], count: int = 1) -> None:
    """Wait until ``on_record`` has been called ``count`` times.

    A stream's record is written as its response ends, after the last body message is sent,
    so a client can see the end of the stream first.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while len(records) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(records) >= count, f"{len(records)} records, expected {count}"


def metrics_showing(base_url: str, *patterns: str) -> str:
    """The server's ``/metrics`` once every regex in ``patterns`` is found in it.

    A stream is counted as its response ends, which the client may see first.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while True:
        text = httpx.get(f"{base_url}/metrics", timeout=STARTUP_TIMEOUT_SECONDS).text
        missing = [pattern for pattern in patterns if not re.search(pattern, text)]
        if not missing:
            return text
        assert time.monotonic() < deadline, f"not in /metrics: {missing}\n{text}"
        time.sleep(0.01)


def guardrail_command() -> list[str]:
    script = Path(sys.executable).with_name("guardrail")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from guardrail.cli import main; main()"]


@contextmanager
def serve_command(
    command: Sequence[str], *, cwd: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> Iterator[tuple[str, ServerLog]]:
    """Run a ``guardrail serve ... --port 0`` command until the block exits, then stop it with Ctrl+C.

    Args:
        command: the command line; it must log "listening on http://127.0.0.1:PORT".
        cwd: the directory to run it in.
        env: the environment; by default this process's.

    Yields:
        The base URL it listens on, and its log (stderr) so far and to come.
    """
    process = subprocess.Popen(
        list(command),
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    log = ServerLog(process.stderr)
    try:
        yield log.wait_for(LISTENING).group(1), log
    finally:
        process.send_signal(signal.SIGINT)
        try:
            returncode = process.wait(timeout=SUBPROCESS_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        finally:
            log.join()
            process.stderr.close()
    assert returncode == 0, "".join(log.lines)


class ServerLog:
    """The lines a subprocess writes to one of its pipes, collected by a thread."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern[str]) -> re.Match[str]:
        with self._changed:
            found = self._changed.wait_for(lambda: self._search(pattern), timeout=SUBPROCESS_STARTUP_SECONDS)
        assert found, "not in the output:\n" + "".join(self.lines)
        return found

    def wait_until(self, done: Callable[[list[str]], bool], what: str) -> None:
        """Wait until ``done`` holds for the lines so far."""
        with self._changed:
            found = self._changed.wait_for(lambda: done(self.lines), timeout=SUBPROCESS_STARTUP_SECONDS)
        assert found, f"not in the output ({what}):\n" + "".join(self.lines)

    def _search(self, pattern: re.Pattern[str]) -> re.Match[str] | None:
        return next((match for line in self.lines if (match := pattern.search(line))), None)

    def join(self) -> None:
        self._thread.join(timeout=SUBPROCESS_STARTUP_SECONDS)
