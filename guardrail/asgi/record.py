"""One record per guarded stream, written when it ends: for logs, audits and billing.

The record says what happened, never more than that: a stream the guard did not see through
to its end says so in ``outcome`` (``client_disconnected``, ``upstream_error``) rather than
"completed". Model text is included only when the middleware was asked to (``record_text``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger("guardrail.record")


@dataclass(slots=True)
class RuleHit:
    """A rule that fired: where (channel and character span of its text) and what it did."""

    rule: str
    action: str
    channel: str
    start: int
    end: int
    detail: str = ""


@dataclass(slots=True)
class StreamRecord:
    """The record of one guarded stream.

    Attributes:
        request_id: the request's ``x-request-id`` header if it had one, else one made up here.
        path: the request path.
        dialect: the stream's dialect (``openai_chat``).
        model: the model named in the request, if any.
        prompt_tokens: tokens of the request's messages, when counted.
        completion_tokens: tokens of the text the client received, when counted.
        time_to_first_token: seconds from the request to the first text the client received.
        duration: seconds from the request to the end of the stream.
        deltas: deltas with text the guard checked.
        outcome: how the stream ended (see :class:`~guardrail.core.outputs.Outcome`).
        hits: the rules that fired, in order.
        text: the text the client received, by channel; only with ``record_text=True``.
        fallback: after a url fallback, its name, the model asked for (None: the request's) and
            the tokens of its answer the client received (also counted in ``completion_tokens``).
    """

    request_id: str
    path: str
    dialect: str
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    time_to_first_token: float | None = None
    duration: float = 0.0
    deltas: int = 0
    outcome: str = ""
    hits: list[RuleHit] = field(default_factory=list)
    text: dict[str, str] | None = None
    fallback: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The record as plain JSON-ready data."""
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), ensure_ascii=False, separators=(",", ":"))


def log_record(record: StreamRecord) -> None:
    """Write ``record`` as one JSON line to the ``guardrail.record`` logger (INFO; DEBUG with text)."""
    if record.text is not None:
        # Model text stays below INFO, so that turning the record log on never ships answers.
        logger.debug("%s", record.to_json())
    elif logger.isEnabledFor(logging.INFO):
        logger.info("%s", record.to_json())
