"""Bad input in the part-2 dialects: the documented error, or a pass-through of what carries no text.

Never a crash, never text the rules have not seen.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from guardrail.core.dialect import DialectStream, Framing
from guardrail.core.dialects.gemini import GeminiStream
from guardrail.core.dialects.ollama import OllamaStream
from guardrail.core.dialects.openai_chat import ChatStream
from guardrail.core.dialects.vercel_ui import UIMessageStream
from guardrail.core.engine import StreamGuard
from guardrail.core.outputs import Anomaly, AnomalyKind, Ended, Outcome, Output, Send
from guardrail.core.rule import Action, BoundRule
from guardrail.rules.banned import BannedPatterns

KEY = "sk-" + "Zq9Xw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe"
RULE = BoundRule("secrets", BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"]), Action.REDACT)


def run(guard: StreamGuard, *chunks: bytes) -> tuple[bytes, list[Output]]:
    outputs = [output for chunk in chunks for output in guard.feed(chunk)] + guard.close()
    return b"".join(o.data for o in outputs if isinstance(o, Send)), outputs


def ended(outputs: list[Output]) -> Outcome | None:
    return next((o.outcome for o in outputs if isinstance(o, Ended)), None)


def test_an_ndjson_line_without_its_newline_at_the_end_is_still_read_and_checked() -> None:
    line = {"model": "m", "created_at": "", "message": {"role": "assistant", "content": f"key {KEY}"}, "done": True}
    wire, outputs = run(StreamGuard([RULE], OllamaStream(Framing.NDJSON)), json.dumps(line).encode())
    assert KEY.encode() not in wire and b"[redacted]" in wire and ended(outputs) is Outcome.COMPLETED


def test_a_10_mb_ndjson_line_ends_the_stream_with_an_ollama_error() -> None:
    huge = json.dumps({"model": "m", "message": {"content": "a" * (10 << 20)}, "done": False}).encode()
    wire, outputs = run(StreamGuard([RULE], OllamaStream(Framing.NDJSON)), huge[: 1 << 20], huge[1 << 20 :], b"\n")
    assert json.loads(wire.splitlines()[-1]).keys() == {"error"}
    assert any(isinstance(o, Anomaly) and o.kind is AnomalyKind.OVERSIZED_EVENT for o in outputs)


def test_an_array_where_an_ollama_object_belongs_passes_only_if_its_strings_are_clean() -> None:
    done = b'{"model":"m","created_at":"","message":{"role":"assistant","content":""},"done":true}\n'
    clean, _ = run(StreamGuard([RULE], OllamaStream(Framing.NDJSON)), b'["hello", 1]\n', done)
    assert clean == b'["hello", 1]\n' + done
    wire, outputs = run(StreamGuard([RULE], OllamaStream(Framing.NDJSON)), json.dumps(["x", KEY]).encode() + b"\n")
    assert KEY.encode() not in wire and ended(outputs) is Outcome.ABORTED


def test_a_ui_part_of_an_unknown_type_passes_if_clean_and_ends_the_stream_if_not() -> None:
    part = b'data: {"type":"x-future","note":"hello"}\n\n'
    wire, outputs = run(StreamGuard([RULE], UIMessageStream()), part, b"data: [DONE]\n\n")
    assert wire == part + b"data: [DONE]\n\n"
    assert any(isinstance(o, Anomaly) and o.kind is AnomalyKind.UNKNOWN_EVENT for o in outputs)
    banned = f'data: {{"type":"x-future","note":"{KEY}"}}\n\n'.encode()
    wire, outputs = run(StreamGuard([RULE], UIMessageStream()), banned)
    assert KEY.encode() not in wire and wire.endswith(b"data: [DONE]\n\n") and ended(outputs) is Outcome.ABORTED


def test_a_malformed_ui_part_ends_the_stream_with_an_error_part() -> None:
    wire, outputs = run(StreamGuard([RULE], UIMessageStream()), b"data: {not json\n\n")
    assert b'"type":"error"' in wire and b"malformed_event" in wire and wire.endswith(b"data: [DONE]\n\n")


def test_a_gemini_chunk_with_no_candidates_passes_and_a_blocked_prompt_is_read() -> None:
    blocked = b'data: {"promptFeedback":{"blockReason":"SAFETY"},"usageMetadata":{"promptTokenCount":3}}\n\n'
    wire, outputs = run(StreamGuard([RULE], GeminiStream()), blocked)
    assert wire == blocked and ended(outputs) is Outcome.COMPLETED
    finish = b'data: {"candidates":[{"index":0,"finishReason":"STOP"}]}\n\n'
    for odd in (b'data: {"candidates":null}\n\n', b'data: {"candidates":[null, 3, "x"]}\n\n'):
        wire, outputs = run(StreamGuard([RULE], GeminiStream()), odd, finish)
        assert wire == odd + finish and ended(outputs) is Outcome.COMPLETED


def test_gemini_text_in_unexpected_shapes_is_still_checked() -> None:
    shapes = [
        {"candidates": [{"content": {"parts": [{"text": f"key {KEY}"}]}}]},  # no index
        {"candidates": [{"content": {"parts": [{"executableCode": {"code": KEY}}]}, "index": 0}]},
        {"candidates": [{"content": {"parts": "text"}, "finishMessage": KEY}]},
        {"candidates": [{"content": {"parts": [{"text": 5}, [KEY]]}}]},
    ]
    for shape in shapes:
        wire, _ = run(StreamGuard([RULE], GeminiStream()), f"data: {json.dumps(shape)}\n\n".encode())
        assert KEY.encode() not in wire, shape


@pytest.mark.parametrize(
    ("make", "clean", "event"),
    [
        (
            ChatStream,
            b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hi. "}}]}\n\n',
            f'data: {{"id":"c","choices":[{{"index":0,"delta":{{"content":"{KEY}","content":"fine"}}}}]}}\n\n',
        ),
        (ChatStream, b"", f'data: {{"id":"{KEY}","id":"c","choices":[]}}\n\n'),
        (
            lambda: ChatStream(Framing.JSON),
            b"",
            f'{{"id":"c","choices":[{{"index":0,"message":{{"content":"{KEY}","content":"ok"}},"finish_reason":"stop"}}]}}',
        ),
        (
            lambda: OllamaStream(Framing.NDJSON),
            b'{"model":"m","message":{"role":"assistant","content":"Hi. "},"done":false}\n',
            f'{{"model":"m","message":{{"role":"assistant","content":"{KEY}","content":"ok"}},"done":false}}\n',
        ),
        (
            GeminiStream,
            b'data: {"candidates":[{"content":{"parts":[{"text":"Hi. "}]},"index":0}]}\n\n',
            f'data: {{"candidates":[{{"content":{{"parts":[{{"text":"{KEY}","text":"ok"}}]}},"index":0}}]}}\n\n',
        ),
        (UIMessageStream, b"", f'data: {{"type":"text-delta","id":"t","delta":"{KEY}","delta":"ok"}}\n\n'),
    ],
)
def test_an_object_that_repeats_a_key_ends_the_stream_and_none_of_it_goes_out(
    make: Callable[[], DialectStream], clean: bytes, event: str
) -> None:
    """Parsers disagree on which value of a repeated key counts: the one the guard did not read
    would reach a client that keeps the first. The event is refused as malformed."""
    wire, outputs = run(StreamGuard([RULE], make()), clean, event.encode())
    assert KEY.encode() not in wire and wire.startswith(clean)
    assert any(isinstance(o, Anomaly) and o.kind is AnomalyKind.MALFORMED_EVENT for o in outputs)
    assert ended(outputs) is Outcome.UPSTREAM_ERROR


def test_long_runs_of_backslashes_are_counted_right_and_in_one_pass() -> None:
    """Quotes are told from escaped ones by the backslashes before them; an attacker's run of
    200,000 (an event of 400 KB) is read in one pass, and a repeated key after it still found."""
    for run in ("\\\\" * 100_000, "\\\\" * 100_000 + '\\"'):
        text = f'data: {{"id":"c","choices":[{{"index":0,"delta":{{"content":"{run}"}}}}]}}\n\n'
        wire, outputs = run_chat(text)
        assert wire.startswith(text.encode()) and ended(outputs) is Outcome.COMPLETED
        repeated = f'data: {{"id":"c","choices":[{{"index":0,"delta":{{"content":"{run}","content":"x"}}}}]}}\n\n'
        wire, outputs = run_chat(repeated)
        assert wire.count(b"\\") < 100 and ended(outputs) is Outcome.UPSTREAM_ERROR


def run_chat(event: str) -> tuple[bytes, list[Output]]:
    return run(StreamGuard([RULE], ChatStream()), event.encode(), b"data: [DONE]\n\n")


def test_json_in_another_encoding_than_utf8_is_refused() -> None:
    """The stdlib parser would read UTF-16 bytes, where the guard's byte-level reading of the event
    (its quotes and backslashes) no longer holds: JSON on the wire is UTF-8, and nothing else is read."""
    body = {"id": "c", "choices": [{"index": 0, "message": {"content": KEY}, "finish_reason": "stop"}]}
    for encoding in ("utf-16-le", "utf-16", "utf-32"):
        wire, outputs = run(StreamGuard([RULE], ChatStream(Framing.JSON)), json.dumps(body).encode(encoding))
        assert KEY.encode(encoding) not in wire and ended(outputs) is Outcome.UPSTREAM_ERROR
