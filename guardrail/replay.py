"""Offline replay: run a recorded stream through the guard and show what the client would see.

A recording is the raw body of an answer in any dialect (an OpenAI chat completion stream by
default; ``dialect`` names another: Responses, Anthropic, Ollama...), as captured with, say,
``curl -N https://.../v1/chat/completions -d @request.json > answer.sse`` (an HTTP head from
``curl -i`` is skipped). :func:`replay` feeds it to a :class:`~guardrail.core.engine.StreamGuard`
one event at a time, as a server would send it, or in pieces of ``chunk_size`` bytes, and
returns what came out: the client's view of the stream, every rule hit and how the stream ended.

A recording holds no timing, so time-based rules (``idle_timeout``) never fire in a replay.
A url fallback cannot be called either: the replay says where the stream would branch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from guardrail.asgi.branch import display_url
from guardrail.core.dialect import EventKind, Framing
from guardrail.core.dialects import get_dialect
from guardrail.core.dialects.openai_chat import ChatStream
from guardrail.core.engine import StreamGuard
from guardrail.core.framing import frames_for
from guardrail.core.outputs import Anomaly, Ended, Intervention, Outcome, Send
from guardrail.core.rule import BoundRule, Fallback
from guardrail.core.sse import SSEDecoder

# An event ends at a blank line, whichever line ending the recording uses.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_HTTP_HEAD_END = re.compile(rb"\r?\n\r?\n")


@dataclass(slots=True)
class ClientView:
    """What an SDK client makes of the guarded stream.

    Attributes:
        text: the text received per channel (``choices[0].content``...), in order of appearance.
        finish_reasons: each choice's ``finish_reason``, by choice index.
        done: whether ``data: [DONE]`` arrived.
        errors: the in-stream error objects (the openai SDK raises ``APIError`` for the first).
    """

    text: dict[str, str] = field(default_factory=dict)
    finish_reasons: dict[int, str] = field(default_factory=dict)
    done: bool = False
    errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class ReplayResult:
    """The outcome of a replay.

    Attributes:
        client: what the client would see.
        hits: every rule hit, in order.
        anomalies: bad input the guard met in the recording.
        outcome: how the stream ended.
        rule: the rule that ended it, if one did.
        fallback: the url fallback the stream would branch to, if it would.
        chunks: how many pieces the recording was fed in.
        wire: the bytes the client would receive.
    """

    client: ClientView
    hits: list[Intervention]
    anomalies: list[Anomaly]
    outcome: Outcome
    rule: str | None
    fallback: Fallback | None
    chunks: int
    wire: bytes

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (``guardrail replay --json``)."""
        fallback = None
        if self.fallback is not None:
            url = display_url(self.fallback.url) if self.fallback.url else None
            fallback = {"name": self.fallback.name, "url": url, "model": self.fallback.model}
        return {
            "client": {
                "text": self.client.text,
                "finish_reasons": {str(index): reason for index, reason in self.client.finish_reasons.items()},
                "done": self.client.done,
                "errors": self.client.errors,
            },
            "hits": [
                {
                    "rule": hit.rule,
                    "action": str(hit.action),
                    "channel": hit.channel,
                    "start": hit.start,
                    "end": hit.end,
                    "leaked": hit.leaked,
                    "detail": hit.detail,
                }
                for hit in self.hits
            ],
            "anomalies": [
                {"kind": str(anomaly.kind), "detail": anomaly.detail, "ended_stream": anomaly.ended_stream}
                for anomaly in self.anomalies
            ],
            "outcome": str(self.outcome),
            "rule": self.rule,
            "fallback": fallback,
            "chunks": self.chunks,
        }


def strip_http_head(data: bytes) -> bytes:
    """``data`` without a leading HTTP status line and headers (a ``curl -i`` capture)."""
    if not data.startswith(b"HTTP/"):
        return data
    end = _HTTP_HEAD_END.search(data)
    return data[end.end() :] if end else b""


def split_events(data: bytes) -> list[bytes]:
    """Cut a recording after each blank line: one piece per event, as a server sends them."""
    pieces: list[bytes] = []
    start = 0
    for match in _EVENT_END.finditer(data):
        pieces.append(data[start : match.end()])
        start = match.end()
    if start < len(data):
        pieces.append(data[start:])
    return pieces


def replay(
    data: bytes, rules: Sequence[BoundRule], *, chunk_size: int | None = None, dialect: str = "openai_chat"
) -> ReplayResult:
    """Run a recorded stream through the guard.

    Args:
        data: the recorded body (an HTTP head before it is skipped).
        rules: the rules to apply.
        chunk_size: feed pieces of this many bytes; by default one event at a time.
        dialect: the dialect the recording is in (see ``guardrail.core.dialects.DIALECTS``).

    Returns:
        What the client would see, the rule hits and the outcome.

    Raises:
        ValueError: ``chunk_size`` is not positive.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    body = strip_http_head(data)
    if chunk_size is None:
        pieces = split_events(body)
    else:
        pieces = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
    framing = _FRAMINGS.get(dialect, Framing.SSE)
    guard = (
        StreamGuard(rules)
        if dialect == "openai_chat"
        else StreamGuard(rules, get_dialect(dialect).start(framing, None))
    )
    outputs = [output for piece in pieces for output in guard.feed(piece)]
    outputs += guard.close()
    ended = next((output for output in outputs if isinstance(output, Ended)), Ended(Outcome.COMPLETED))
    wire = b"".join(output.data for output in outputs if isinstance(output, Send))
    fallback = ended.fallback if ended.fallback is not None and ended.fallback.url is not None else None
    return ReplayResult(
        client=client_view(wire) if dialect == "openai_chat" else dialect_view(wire, dialect),
        hits=[output for output in outputs if isinstance(output, Intervention)],
        anomalies=[output for output in outputs if isinstance(output, Anomaly)],
        outcome=ended.outcome,
        rule=ended.rule,
        fallback=fallback,
        chunks=len(pieces),
        wire=wire,
    )


def client_view(wire: bytes) -> ClientView:
    """Read an OpenAI chat stream as a client would: text per channel, finish reasons, ``[DONE]``, errors.

    Args:
        wire: the stream's bytes.

    Returns:
        The client's view.
    """
    view = ClientView()
    decoder = SSEDecoder()
    reader = ChatStream()
    for event in [*decoder.feed(wire), *decoder.close()]:
        parsed = reader.parse(event.raw, event)
        if parsed.kind is EventKind.END:
            view.done = True
        elif parsed.kind is EventKind.ERROR and parsed.data is not None:
            error = parsed.data["error"]
            view.errors.append(error if isinstance(error, dict) else {"message": str(error)})
        elif parsed.kind in (EventKind.TEXT, EventKind.PASS) and isinstance(parsed.data, dict):
            for piece in parsed.pieces:
                view.text[piece.channel] = view.text.get(piece.channel, "") + piece.text
            for pos, choice in enumerate(parsed.data.get("choices") or ()):
                if isinstance(choice, dict) and choice.get("finish_reason"):
                    index = choice.get("index", pos)
                    view.finish_reasons[index if isinstance(index, int) else pos] = str(choice["finish_reason"])
    return view


# The framing of a recording in each dialect: event streams but for Ollama (NDJSON) and text.
_FRAMINGS = {"ollama": Framing.NDJSON, "text": Framing.TEXT}


def dialect_view(wire: bytes, dialect: str) -> ClientView:
    """Read a guarded answer in ``dialect`` as its client would: the text per channel, the end, errors."""
    view = ClientView()
    reader = get_dialect(dialect).start(_FRAMINGS.get(dialect, Framing.SSE), None)
    frames = frames_for(reader.framing)
    for raw, fields in [*frames.feed(wire), *frames.close()]:
        parsed = reader.parse(raw, fields)
        for piece in parsed.pieces:
            view.text[piece.channel] = view.text.get(piece.channel, "") + piece.text
        if parsed.kind is EventKind.END:
            view.done = True
        elif parsed.kind is EventKind.ERROR and isinstance(parsed.data, dict):
            error = parsed.data.get("error", parsed.data)
            view.errors.append(error if isinstance(error, dict) else {"message": str(error)})
    return view


def render_text(result: ReplayResult) -> str:
    """The result for a terminal: the client's view, a table of rule hits, and the outcome."""
    lines = ["What the client sees:"]
    client = result.client
    if not client.text:
        lines.append("  (no text)")
    for channel, text in client.text.items():
        lines.append(f"  {channel}:")
        lines.extend(f"    | {line}" for line in text.split("\n"))
    finishes = ", ".join(f"choices[{index}] {reason}" for index, reason in client.finish_reasons.items())
    lines.append(f"  finish_reason: {finishes or '(none)'}")
    lines.append(f"  [DONE]: {'yes' if client.done else 'no'}")
    for error in client.errors:
        lines.append(f"  error event: {error.get('message', '')} (code {error.get('code')})")
    lines.append("")
    lines.append("Rule hits:" if result.hits else "Rule hits: none")
    if result.hits:
        lines.extend(_table(result.hits))
    for anomaly in result.anomalies:
        lines.append(f"Anomaly: {anomaly.kind}: {anomaly.detail}")
    lines.append("")
    outcome = f"Outcome: {result.outcome}"
    if result.rule is not None:
        outcome += f" (rule {result.rule})"
    lines.append(f"{outcome}; the recording was fed in {result.chunks} piece(s).")
    if result.fallback is not None:
        url = display_url(result.fallback.url) if result.fallback.url else ""
        lines.append(
            f"The stream would go on with the answer of fallback {result.fallback.name!r} from {url} "
            "(a replay does not call it)."
        )
    return "\n".join(lines)


def _table(hits: Sequence[Intervention]) -> list[str]:
    header = ("RULE", "ACTION", "CHANNEL", "START", "END", "LEAKED", "DETAIL")
    rows = [
        (hit.rule, str(hit.action), hit.channel, str(hit.start), str(hit.end), str(hit.leaked), hit.detail)
        for hit in hits
    ]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header) - 1)]
    numeric = {3, 4, 5}
    out = []
    for row in (header, *rows):
        cells = [
            cell.rjust(width) if column in numeric and row is not header else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=False))
        ]
        out.append("  " + "  ".join([*cells, row[-1]]).rstrip())
    return out
