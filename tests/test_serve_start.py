"""Starting ``guardrail serve``: a port already taken, liveness and readiness, several workers."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from guardrail._types import Receive, Scope, Send
from guardrail.cli import main
from guardrail.proxy.app import ServeSettings, build_app
from tests.servers import guardrail_command, serve_command, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RULES = str(ROOT / "rules" / "default.yaml")
TIMEOUT = 30.0


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another server listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def test_a_taken_port_is_named_with_the_fix_and_no_traceback(taken_port: int) -> None:
    result = CliRunner().invoke(main, ["serve", "--rules", DEFAULT_RULES, "--port", str(taken_port)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output == (
        f"guardrail serve: cannot listen on 127.0.0.1:{taken_port}: port {taken_port} is already in use "
        f"(by another server?); stop it, or choose another port: `make run PORT={taken_port + 1}`, "
        f"or `guardrail serve --port {taken_port + 1}`\n"
    )


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nothing listens on (bound, so nothing else takes it meanwhile)."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


async def answer_anything(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def probe(upstream: str) -> tuple[httpx.Response, httpx.Response]:
    settings = ServeSettings((DEFAULT_RULES,), upstream=upstream)
    with serve_in_thread(build_app(settings, registry=CollectorRegistry())) as base_url:
        return httpx.get(f"{base_url}/healthz", timeout=TIMEOUT), httpx.get(f"{base_url}/readyz", timeout=TIMEOUT)


def test_readyz_reports_an_unreachable_upstream_while_healthz_stays_live(closed_port: int) -> None:
    health, ready = probe(f"http://127.0.0.1:{closed_port}/v1")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 503
    assert ready.json() == {
        "status": "unavailable",
        "upstream": f"http://127.0.0.1:{closed_port}/v1 cannot be reached (ConnectError)",
    }


def test_readyz_is_ok_when_the_upstream_answers_at_all() -> None:
    with serve_in_thread(answer_anything) as upstream:
        health, ready = probe(f"{upstream}/v1")
    assert health.status_code == ready.status_code == 200 and ready.json() == {"status": "ok"}


SLOW_START = """\
import sys, time
if "--multiprocessing-fork" in sys.orig_argv:  # a worker process, not the supervisor
    time.sleep({seconds})
"""


def test_workers_slower_to_start_than_uvicorns_default_health_check_are_not_killed(tmp_path: Path) -> None:
    """On a busy machine with cold caches a worker took 6-10 s to import; uvicorn's supervisor
    used to kill it after 5 s ("Child process died") and start another, which could die the same way.
    """
    (tmp_path / "sitecustomize.py").write_text(SLOW_START.format(seconds=6.5), encoding="utf-8")
    command = [*guardrail_command(), "serve", "--rules", DEFAULT_RULES, "--port", "0", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with serve_command(command, cwd=tmp_path, env=env) as (base_url, log):

        def started_or_died(lines: list[str]) -> bool:
            return sum("Application startup complete" in line for line in lines) == 2 or any(
                "died" in line for line in lines
            )

        log.wait_until(started_or_died, "both workers started, or one was killed")
        assert httpx.get(f"{base_url}/healthz", timeout=TIMEOUT).status_code == 200
    assert not any("died" in line or "Traceback" in line for line in log.lines), "".join(log.lines)
