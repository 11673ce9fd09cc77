"""Parsing OpenAI chat chunks: the quick path for plain content deltas agrees with the general one."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, strategies as st

from guardrail.core.dialect import EventKind
from guardrail.core.dialects.openai_chat import ChatStream
from guardrail.core.sse import SSEEvent

texts = st.sampled_from(["", " hello", "sk-", "\u2028", None, 7, ["x"]])
deltas = st.fixed_dictionaries(
    {},
    optional={
        "content": texts,
        "role": st.sampled_from(["assistant", None]),
        "refusal": texts,
        "tool_calls": st.sampled_from([None, [], [{"index": 0, "function": {"arguments": "{}"}}]]),
    },
)
choices = st.fixed_dictionaries(
    {"delta": deltas | st.sampled_from([None, "text", {}])},
    optional={
        "index": st.sampled_from([0, 1, 7, 8, -1, True, "0", None]),
        "finish_reason": st.sampled_from([None, "stop", "length"]),
        "logprobs": st.none(),
    },
)


def event_of(obj: dict[str, Any]) -> SSEEvent:
    data = json.dumps(obj)
    return SSEEvent(f"data: {data}\n\n".encode(), data)


@given(choice=choices)
def test_a_single_choice_parses_as_the_general_path_parses_it(choice: dict[str, Any]) -> None:
    obj: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    obj["choices"] = [choice]
    event = event_of(obj)
    quick = ChatStream().parse(event.raw, event)
    general = ChatStream()._parse_chunk(event.raw, obj, obj["choices"], (), "delta")
    assert (quick.kind, quick.pieces, quick.waits) == (general.kind, general.pieces, general.waits)
    assert sorted(quick.others) == sorted(general.others)


def test_a_content_delta_is_one_piece_on_its_choices_content_channel() -> None:
    obj = {"id": "c", "choices": [{"index": 2, "delta": {"content": " hi"}, "logprobs": None, "finish_reason": None}]}
    event = event_of(obj)
    parsed = ChatStream().parse(event.raw, event)
    assert parsed.kind is EventKind.TEXT
    assert [(piece.channel, piece.text) for piece in parsed.pieces] == [("choices[2].content", " hi")]
    assert parsed.waits == ()


def test_logprobs_that_do_not_spell_the_text_never_reach_the_client() -> None:
    from guardrail.core.engine import StreamGuard
    from guardrail.core.outputs import Send
    from guardrail.core.rule import Action, BoundRule
    from guardrail.rules.banned import BannedPatterns

    key = "sk-" + "Zq9Xw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe"
    rule = BoundRule("keys", BannedPatterns(patterns=[r"sk-[A-Za-z0-9]{20,}"]), Action.REDACT)

    def chunk(text: str, tokens: list[str]) -> bytes:
        entries = [{"token": t, "logprob": -0.1, "bytes": list(t.encode()), "top_logprobs": []} for t in tokens]
        choice = {"index": 0, "delta": {"content": text}, "logprobs": {"content": entries}, "finish_reason": None}
        return f"data: {json.dumps({'id': 'c', 'choices': [choice]})}\n\n".encode()

    guard = StreamGuard([rule])
    honest = chunk("Hello", ["Hel", "lo"])
    hostile = chunk(" there", [" there", key[:12]]) + chunk(".", [".", key[12:]])
    wire = b"".join(o.data for o in guard.feed(honest + hostile) + guard.close() if isinstance(o, Send))
    assert wire.startswith(honest)  # tokens that spell the text pass as they came
    assert key[:12].encode() not in wire and key[12:].encode() not in wire


# A quick-path chunk the guard rewrites (its text held back, released later, or redacted) is
# written around a frame made once per shape of chunk: it must read as the chunk itself, with
# only its content changed, whatever shapes follow one another and whatever the strings hold.
identities = st.fixed_dictionaries(
    {"id": st.sampled_from(["chatcmpl-1", "chatcmpl-2", "\x00guardrail text\x00", 'q"\u2028'])},
    optional={
        "object": st.just("chat.completion.chunk"),
        "created": st.sampled_from([1, 2]),
        "model": st.sampled_from(["m", "\x00guardrail text\x00"]),
        "system_fingerprint": st.sampled_from(["fp", None]),
    },
)
quick_choices = st.fixed_dictionaries(
    {"delta": st.builds(lambda text: {"content": text}, st.sampled_from([" hi", "x"]))},
    optional={
        "index": st.sampled_from([0, 1]),
        "finish_reason": st.sampled_from([None, ""]),
        "logprobs": st.none(),
    },
)
replacements = st.sampled_from(["", "held", " w\u2028x", "\x00guardrail text\x00", '"q\\', "\ud800", "é"])


@given(st.lists(st.tuples(identities, quick_choices, st.booleans(), replacements), min_size=1, max_size=12))
def test_a_rewritten_chunk_is_the_chunk_with_its_new_text(chunks: list[tuple[Any, Any, bool, str]]) -> None:
    stream = ChatStream()
    for identity, choice, choices_first, text in chunks:
        obj = {"choices": [choice], **identity} if choices_first else {**identity, "choices": [choice]}
        event = event_of(obj)
        parsed = stream.parse(event.raw, event)
        assert parsed.pieces and parsed.pieces[0].path == ("choices", 0, "delta", "content")  # the quick path
        written = stream.rewrite(parsed, {0: text}, None)  # type: ignore[arg-type]  # (no ledger needed here)
        if not text:
            assert written == b""
            continue
        assert written.startswith(b"data: ") and written.endswith(b"\n\n") and written.count(b"\n") == 2
        expected = {**obj, "choices": [{**choice, "delta": {"content": text}}]}
        assert json.loads(written[len(b"data: ") :]) == json.loads(json.dumps(expected))
