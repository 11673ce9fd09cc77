"""``guardrail try``: ask a running guard one question and show what its client gets.

:func:`ask` sends one chat completion request (``stream: true``) to a guard (``guardrail serve``,
or an app with the middleware), writes the answer's text as it arrives, then returns how it
ended: the finish reason, or the error the guard or the model sent. Which rules fired is read
from the guard's ``/metrics``, before and after the answer: the guard sends nothing about its
rules to clients, so this is the count of every intervention the guard made meanwhile (on a
guard serving others too, theirs as well).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from guardrail.core.sse import SSEDecoder

# make run's address.
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_MODEL = "guardrail-demo"
# The demo model's slowest answer (a stall, then the fallback) takes about ten seconds.
READ_TIMEOUT_SECONDS = 120.0
_INTERVENTIONS = "guardrail_interventions_total"


class GuardUnreachable(Exception):
    """No guard answered at the URL."""


@dataclass
class Answer:
    """How an answer ended, as its client saw it.

    Attributes:
        request_id: the ``x-request-id`` sent (the guard's log and stream record use it).
        status: the HTTP status of the response.
        finish_reason: the last ``finish_reason`` of the first choice, if one came.
        error: the error the guard or the model sent (in the stream or as the response), if any.
        rules: interventions counted at the guard while the answer streamed: ``(rule, action)``
            to how many; None when the guard has no ``/metrics``.
    """

    request_id: str
    status: int = 0
    finish_reason: str | None = None
    error: dict[str, object] | None = None
    rules: dict[tuple[str, str], int] | None = field(default=None)


def ask(
    prompt: str,
    write: Callable[[str], None],
    *,
    url: str = DEFAULT_URL,
    model: str = DEFAULT_MODEL,
    api_key: str | None = None,
) -> Answer:
    """Stream one answer from the guard at ``url``, writing its text as it arrives.

    Args:
        prompt: the user message.
        write: called with each piece of the answer's text.
        url: the guard's base URL (the chat endpoint is ``/v1/chat/completions`` under it).
        model: the model to ask for.
        api_key: sent as ``Authorization: Bearer ...`` (the guard passes it to its upstream).

    Returns:
        How the answer ended, and which rules fired.

    Raises:
        GuardUnreachable: nothing answered at ``url``, or the connection broke.
    """
    base = url.rstrip("/")
    answer = Answer(request_id=uuid.uuid4().hex)
    headers = {"x-request-id": answer.request_id}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    timeout = httpx.Timeout(READ_TIMEOUT_SECONDS, connect=5.0)
    try:
        with httpx.Client(timeout=timeout) as client:
            before = _interventions(client, base)
            with client.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers) as response:
                answer.status = response.status_code
                if response.status_code != 200:
                    answer.error = _error_of(response.read())
                else:
                    _read_stream(response, answer, write)
            after = _interventions(client, base)
    except httpx.TransportError as exc:
        raise GuardUnreachable(f"no guard answered at {base} ({type(exc).__name__})") from exc
    if before is not None and after is not None:
        fired = {key: int(after[key] - before.get(key, 0.0)) for key in after}
        answer.rules = {key: count for key, count in fired.items() if count > 0}
    return answer


def _read_stream(response: httpx.Response, answer: Answer, write: Callable[[str], None]) -> None:
    decoder = SSEDecoder()
    for chunk in response.iter_bytes():
        for event in decoder.feed(chunk):
            if event.data is None or event.data == "[DONE]":
                continue
            try:
                data = json.loads(event.data)
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            if "error" in data:
                answer.error = _as_error(data["error"])
            for choice in data.get("choices") or ():
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    text = (choice.get("delta") or {}).get("content")
                    if isinstance(text, str) and text:
                        write(text)
                    answer.finish_reason = choice.get("finish_reason") or answer.finish_reason


def _error_of(body: bytes) -> dict[str, object]:
    try:
        data = json.loads(body)
    except ValueError:
        return {"message": body.decode("utf-8", "replace")[:500]}
    return _as_error(data.get("error", data) if isinstance(data, dict) else data)


def _as_error(error: object) -> dict[str, object]:
    return error if isinstance(error, dict) else {"message": str(error)}


def _interventions(client: httpx.Client, base: str) -> dict[tuple[str, str], float] | None:
    """The guard's intervention counters by (rule, action); None if it serves no Prometheus metrics."""
    response = client.get(f"{base}/metrics")
    if response.status_code != 200 or _INTERVENTIONS not in response.text:
        return None
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == _INTERVENTIONS:
                key = (sample.labels.get("rule", ""), sample.labels.get("action", ""))
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def describe_rules(rules: dict[tuple[str, str], int] | None) -> str:
    """The rules that fired, for a person: ``secrets (redact ×2), blocked-phrases (abort)``."""
    if rules is None:
        return "unknown (the guard serves no /metrics)"
    if not rules:
        return "none"
    return ", ".join(
        f"{rule} ({action}{f' ×{count}' if count > 1 else ''})" for (rule, action), count in sorted(rules.items())
    )
