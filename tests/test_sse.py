from __future__ import annotations

import ast
import json
import re
from itertools import accumulate, pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from guardrail.core.sse import MAX_EVENT_BYTES, SSEDecoder, SSEEvent, encode_comment, encode_event
from guardrail.exceptions import SSEError
from tests.helpers import decode_all_ways, fail_all_ways, feed_all_ways

BOM = b"\xef\xbb\xbf"


def decoder_with_cap(max_event_bytes: int) -> SSEDecoder:
    return SSEDecoder(max_event_bytes=max_event_bytes)


def dispatched(events: list[SSEEvent]) -> list[str]:
    """The data of the events a browser EventSource would dispatch."""
    return [event.data for event in events if event.data is not None]


def openai_chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-abc123",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


# Line ends


def test_lf_line_ends() -> None:
    events = feed_all_ways(SSEDecoder, b"data: one\n\ndata: two\n\n")
    assert events == [SSEEvent(b"data: one\n\n", "one"), SSEEvent(b"data: two\n\n", "two")]


def test_cr_line_ends() -> None:
    events = feed_all_ways(SSEDecoder, b"data: one\r\rdata: two\r\r")
    assert events == [SSEEvent(b"data: one\r\r", "one"), SSEEvent(b"data: two\r\r", "two")]


def test_crlf_line_ends_give_no_extra_events() -> None:
    events = feed_all_ways(SSEDecoder, b"data: one\r\ndata: more\r\n\r\ndata: two\r\n\r\n")
    assert dispatched(events) == ["one\nmore", "two"]
    # A block ending in CR is returned at once, so the LF completing that CRLF starts the next block;
    # the last one comes back from close() so that no byte is lost.
    assert [event.raw for event in events] == [b"data: one\r\ndata: more\r\n\r", b"\ndata: two\r\n\r", b"\n"]


def test_mixed_line_ends() -> None:
    events = feed_all_ways(SSEDecoder, b"data: a\rdata: b\ndata: c\r\n\ndata: d\n\r\n")
    assert dispatched(events) == ["a\nb\nc", "d"]


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n\r") == [SSEEvent(b"data: a\r\ndata: b\r\n\r", "a\nb")]
    assert decoder.feed(b"\n") == []
    assert decoder.close() == [SSEEvent(b"\n", None)]
    assert decoder.discarded == 0


def test_lone_cr_then_cr_is_a_blank_line() -> None:
    events = feed_all_ways(SSEDecoder, b"data: a\r\r\n")
    assert events == [SSEEvent(b"data: a\r\r", "a"), SSEEvent(b"\n", None)]


def test_unicode_line_separators_do_not_end_lines() -> None:
    text = "a\u2028b\u2029c\x85d\x0be\x0cf"
    events = feed_all_ways(SSEDecoder, f"data: {text}\n\n".encode())
    assert dispatched(events) == [text]


# Byte order mark


def test_leading_bom_is_stripped_and_not_forwarded() -> None:
    events = feed_all_ways(SSEDecoder, BOM + b"data: 1\n\n")
    assert events == [SSEEvent(b"data: 1\n\n", "1")]


def test_bom_split_across_chunks_is_stripped() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(BOM[:1]) == []
    assert decoder.feed(BOM[1:2]) == []
    assert decoder.feed(BOM[2:] + b"data: 1\n") == []
    assert decoder.feed(b"\n") == [SSEEvent(b"data: 1\n\n", "1")]


def test_second_bom_is_not_stripped_and_loses_the_first_event() -> None:
    # WPT eventsource/format-bom-2: the second BOM joins the field name, so "1" never arrives.
    stream = BOM + BOM + b"data: 1\n\ndata: 2\n\ndata: 3\n\n"
    events = feed_all_ways(SSEDecoder, stream)
    assert dispatched(events) == ["2", "3"]
    assert events[0] == SSEEvent(BOM + b"data: 1\n\n", None)


def test_bom_bytes_later_in_the_stream_are_kept() -> None:
    events = feed_all_ways(SSEDecoder, b"data: 1\n\n" + BOM + b"data: 2\n\n")
    assert dispatched(events) == ["1"]
    assert events[1].raw == BOM + b"data: 2\n\n"


def test_incomplete_bom_at_end_of_stream_is_discarded() -> None:
    assert decode_all_ways(SSEDecoder, BOM[:2]) == ([], 2)


def test_partial_bom_followed_by_other_bytes_is_repaired_text() -> None:
    events = feed_all_ways(SSEDecoder, BOM[:2] + b"data: 1\n\n")
    assert events == [SSEEvent("\ufffddata: 1\n\n".encode(), None)]


# Comments and blank lines


def test_comments_come_back_as_pass_through_events() -> None:
    events = feed_all_ways(SSEDecoder, b": ping\n\n:\n\n:no space\ndata: x\n\n")
    assert events == [
        SSEEvent(b": ping\n\n", None, comments=(" ping",)),
        SSEEvent(b":\n\n", None, comments=("",)),
        SSEEvent(b":no space\ndata: x\n\n", "x", comments=("no space",)),
    ]


def test_stray_blank_lines_come_back_as_empty_blocks() -> None:
    events = feed_all_ways(SSEDecoder, b"\ndata: x\n\n\n")
    assert events == [SSEEvent(b"\n", None), SSEEvent(b"data: x\n\n", "x"), SSEEvent(b"\n", None)]


# Fields


def test_multi_line_data_is_joined_with_lf() -> None:
    events = feed_all_ways(SSEDecoder, b"data: first\ndata: second\ndata:\ndata: fourth\n\n")
    assert dispatched(events) == ["first\nsecond\n\nfourth"]


def test_field_without_colon_has_an_empty_value() -> None:
    events = feed_all_ways(SSEDecoder, b"data\n\ndata:\n\ndata\ndata\n\n")
    assert dispatched(events) == ["", "", "\n"]


def test_only_one_leading_space_is_removed() -> None:
    events = feed_all_ways(SSEDecoder, b"data:  x\n\ndata:x\n\ndata: a: b\n\n")
    assert dispatched(events) == [" x", "x", "a: b"]


def test_space_before_colon_makes_an_unknown_field() -> None:
    events = feed_all_ways(SSEDecoder, b"data : x\n\n")
    assert events == [SSEEvent(b"data : x\n\n", None)]


def test_field_names_are_case_sensitive() -> None:
    events = feed_all_ways(SSEDecoder, b"Event: x\nDATA: y\ndata: z\n\n")
    assert events == [SSEEvent(b"Event: x\nDATA: y\ndata: z\n\n", "z")]


def test_event_field_last_one_wins() -> None:
    events = feed_all_ways(SSEDecoder, b"event: a\nevent: b\ndata: x\n\nevent: end\n\n")
    assert [(event.event, event.data) for event in events] == [("b", "x"), ("end", None)]


def test_id_with_nul_is_ignored() -> None:
    events = feed_all_ways(SSEDecoder, b"id: 1\nid: 2\x003\ndata: x\n\nid: a\x00\ndata: y\n\nid\ndata: z\n\n")
    assert [event.id for event in events] == ["1", None, ""]


def test_retry_must_be_ascii_digits() -> None:
    stream = "retry: 1000\nretry: 10x\nretry: +5\nretry:  7\nretry: 1_0\nretry: \u0661\u0662\nretry:\n\n"
    events = feed_all_ways(SSEDecoder, stream.encode())
    assert [event.retry for event in events] == [1000]
    assert [event.retry for event in feed_all_ways(SSEDecoder, b"retry: x\n\n")] == [None]


def test_unknown_fields_are_ignored() -> None:
    events = feed_all_ways(SSEDecoder, b"foo: bar\nevent2: x\ndata: y\n\n")
    assert events == [SSEEvent(b"foo: bar\nevent2: x\ndata: y\n\n", "y")]


# Real streams and text


def test_typical_openai_stream() -> None:
    stream = b"".join(
        [
            openai_chunk({"role": "assistant", "content": ""}),
            openai_chunk({"content": "Hello"}),
            b": keep-alive\n\n",
            openai_chunk({"content": ", world"}),
            openai_chunk({}, finish_reason="stop"),
            b"data: [DONE]\n\n",
        ]
    )
    events, discarded = decode_all_ways(SSEDecoder, stream)
    assert discarded == 0
    assert b"".join(event.raw for event in events) == stream
    payloads = dispatched(events)
    assert payloads[-1] == "[DONE]"
    contents = [json.loads(payload)["choices"][0]["delta"].get("content") for payload in payloads[:-1]]
    assert contents == ["", "Hello", ", world", None]


def test_multi_byte_characters_split_across_chunks_arrive_intact() -> None:
    text = "안녕하세요 👋🏽 세계 🇰🇷"
    stream = f"data: {text}\nevent: 인사\n\n".encode()
    # feed_all_ways splits inside every multi-byte character.
    events = feed_all_ways(SSEDecoder, stream)
    assert events == [SSEEvent(stream, text, event="인사")]


def test_invalid_utf8_becomes_replacement_characters_and_raw_is_repaired() -> None:
    stream = b"data: ok\n\ndata: bad \xff \xe2\x82 end\n\n: fine \xe2\x82\xac\n\n"
    events = feed_all_ways(SSEDecoder, stream)
    assert events[0] == SSEEvent(b"data: ok\n\n", "ok")
    assert events[1] == SSEEvent("data: bad \ufffd \ufffd end\n\n".encode(), "bad \ufffd \ufffd end")
    assert events[2] == SSEEvent(": fine \u20ac\n\n".encode(), None, comments=(" fine \u20ac",))


def test_truncated_character_before_line_end_is_replaced() -> None:
    events = feed_all_ways(SSEDecoder, b"data: \xf0\x9f\x91\ndata: x\n\n")
    assert events == [SSEEvent("data: \ufffd\ndata: x\n\n".encode(), "\ufffd\nx")]


@pytest.mark.parametrize(
    "stream",
    [
        b"data: a\n\n: ping\n\nevent: e\nid: 1\nretry: 5\ndata: b\n\n",
        b"data: a\r\n\r\ndata: b\r\n\r\n",
        b"\r\n\r\n\n\r\r\ndata: a\r\r\n\r\n",
        "data: 한국어\r: 😀\r\r".encode(),
        BOM + b"data: x\n\n",
    ],
)
def test_raw_of_all_events_reproduces_the_input(stream: bytes) -> None:
    events, discarded = decode_all_ways(SSEDecoder, stream)
    assert discarded == 0
    assert b"".join(event.raw for event in events) == stream.removeprefix(BOM)


# End of stream


def test_unterminated_final_event_is_discarded_with_its_size() -> None:
    events, discarded = decode_all_ways(SSEDecoder, b"data: kept\n\ndata: lost\ndata: too")
    assert events == [SSEEvent(b"data: kept\n\n", "kept")]
    assert discarded == len(b"data: lost\ndata: too")


def test_final_line_without_blank_line_is_discarded() -> None:
    assert decode_all_ways(SSEDecoder, b"data: [DONE]\n") == ([], len(b"data: [DONE]\n"))
    assert decode_all_ways(SSEDecoder, b"data: [DONE]\r") == ([], len(b"data: [DONE]\r"))


def test_complete_stream_discards_nothing() -> None:
    assert decode_all_ways(SSEDecoder, b"data: x\n\n") == ([SSEEvent(b"data: x\n\n", "x")], 0)
    assert decode_all_ways(SSEDecoder, b"") == ([], 0)


def test_feed_after_close_is_a_bug() -> None:
    decoder = SSEDecoder()
    decoder.close()
    with pytest.raises(RuntimeError):
        decoder.feed(b"data: x\n\n")
    assert decoder.close() == []


# Size cap


def test_block_of_exactly_the_cap_is_accepted() -> None:
    block = b"data: 12345\n\n"
    assert feed_all_ways(lambda: decoder_with_cap(len(block)), block) == [SSEEvent(block, "12345")]


def test_block_over_the_cap_raises() -> None:
    block = b"data: 12345\n\n"
    message = fail_all_ways(lambda: decoder_with_cap(len(block) - 1), b"data: ok\n\n" + block)
    assert message == f"event exceeds {len(block) - 1} bytes without ending"


def test_cap_counts_every_line_of_the_block() -> None:
    fail_all_ways(lambda: decoder_with_cap(20), b"data: 1\ndata: 2\ndata: 3\n\n")


def test_cap_counts_the_lf_that_completes_a_crlf() -> None:
    fail_all_ways(lambda: decoder_with_cap(8), b"data: 1\r\n")
    fail_all_ways(lambda: decoder_with_cap(9), b"data: 1\r\n\r\n")
    assert dispatched(feed_all_ways(lambda: decoder_with_cap(10), b"data: 1\r\n\r\n")) == ["1"]


def test_unterminated_line_over_the_cap_raises_before_it_ends() -> None:
    decoder = decoder_with_cap(100)
    decoder.feed(b"data: " + b"x" * 94)
    with pytest.raises(SSEError, match="event exceeds 100 bytes without ending"):
        decoder.feed(b"x")


def test_errors_are_sticky() -> None:
    decoder = decoder_with_cap(10)
    with pytest.raises(SSEError):
        decoder.feed(b"data: 1234567890")
    with pytest.raises(SSEError, match=re.escape("already failed: event exceeds 10 bytes")):
        decoder.feed(b"\n\n")
    with pytest.raises(SSEError):
        decoder.feed(b"")
    with pytest.raises(SSEError):
        decoder.close()


def test_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SSEDecoder(max_event_bytes=0)


def test_default_cap_is_one_mebibyte() -> None:
    assert MAX_EVENT_BYTES == 1024 * 1024


def test_long_line_fed_byte_by_byte_takes_linear_time() -> None:
    # Quadratic buffering would copy ~20 GB here and take minutes.
    stream = b"data: " + b"x" * 200_000 + b"\n\n"
    decoder = SSEDecoder()
    events = [event for index in range(len(stream)) for event in decoder.feed(stream[index : index + 1])]
    assert events == [SSEEvent(stream, "x" * 200_000)]


def test_many_lines_fed_byte_by_byte_take_linear_time() -> None:
    stream = b"data: x\n" * 25_000 + b"\n"
    decoder = SSEDecoder()
    events = [event for index in range(len(stream)) for event in decoder.feed(stream[index : index + 1])]
    assert events == [SSEEvent(stream, "\n".join(["x"] * 25_000))]


def test_long_line_fed_byte_by_byte_hits_the_cap() -> None:
    decoder = decoder_with_cap(100_000)
    with pytest.raises(SSEError, match="event exceeds 100000 bytes"):
        for _ in range(200_000):
            decoder.feed(b"x")


# One whole data block per chunk: the fast path


class GeneralPathDecoder(SSEDecoder):
    """The decoder with its one-block fast path turned off: every chunk goes the general way."""

    def _read_data_event(self, chunk: bytes) -> SSEEvent | None:
        return None


def outcome(decoder: SSEDecoder, chunk: bytes | None) -> list[SSEEvent] | str:
    """What ``decoder.feed(chunk)`` (``close()`` for None) returns, or the message of the SSEError it raises."""
    try:
        return decoder.close() if chunk is None else decoder.feed(chunk)
    except SSEError as error:
        return str(error)


def declared_slots() -> tuple[str, ...]:
    """SSEDecoder's ``__slots__`` as its source declares them (the compiled build's class has none)."""
    source = (Path(__file__).resolve().parent.parent / "guardrail" / "core" / "sse.py").read_text()
    (decoder,) = [node for node in ast.walk(ast.parse(source)) if getattr(node, "name", None) == "SSEDecoder"]
    for statement in getattr(decoder, "body", []):
        if isinstance(statement, ast.Assign) and ast.unparse(statement.targets[0]) == "__slots__":
            names: tuple[str, ...] = ast.literal_eval(statement.value)
            return names
    raise AssertionError("SSEDecoder declares no __slots__")


STATE = tuple(name for name in declared_slots() if name != "_failure")


def state(decoder: SSEDecoder) -> dict[str, object]:
    """All that the decoder keeps between calls, but the error it failed with (compared by message)."""
    return {name: getattr(decoder, name) for name in STATE}


def feed_each(
    chunks: list[bytes], max_event_bytes: int = MAX_EVENT_BYTES
) -> tuple[list[list[SSEEvent]], str | None, int]:
    """Feed ``chunks`` to a decoder, then close it, checking every step against a GeneralPathDecoder.

    Returns:
        What each feed() and close() returned, the SSEError that stopped them if any, and ``discarded``.
    """
    decoder = SSEDecoder(max_event_bytes=max_event_bytes)
    reference = GeneralPathDecoder(max_event_bytes=max_event_bytes)
    results: list[list[SSEEvent]] = []
    for chunk in [*chunks, None]:
        result = outcome(decoder, chunk)
        assert result == outcome(reference, chunk)
        assert state(decoder) == state(reference)
        if isinstance(result, str):
            return results, result, decoder.discarded
        results.append(result)
    return results, None, decoder.discarded


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        pytest.param([b"data: a\n\n", b"data: b\n\n"], [["a"], ["b"]], id="one block per chunk"),
        pytest.param([b"data: a\n\ndata: b\n\n"], [["a", "b"]], id="two blocks in one chunk"),
        pytest.param(
            [b"data:x\n\n", b"data:  x\n\n", b"data:\n\n", b"data: \n\n"], [["x"], [" x"], [""], [""]], id="spaces"
        ),
        pytest.param([b"data\n\n", b"data: x\n\n"], [[""], ["x"]], id="no colon"),
        pytest.param([b"data: a\ndata: b\n\n"], [["a\nb"]], id="two data lines"),
        pytest.param([b"data: a\n\n\n"], [["a", None]], id="then a stray blank line"),
        pytest.param([b"data: a", b"\n\n", b"data: b\n\n"], [[], ["a"], ["b"]], id="block cut short"),
        pytest.param([b"data: a\n\ndata: b", b"\n\n"], [["a"], ["b"]], id="chunk ends mid-block"),
        pytest.param([b"data: a\n", b"data: b\n\n"], [[], ["a\nb"]], id="chunk completes a pending block"),
        pytest.param(
            [b"data: a\r\n\r", b"data: b\n\n", b"\ndata: c\n\n"], [["a"], ["b"], [None, "c"]], id="after a CR"
        ),
        pytest.param([b"data: a\r\n\r\n", b"data: b\n\n"], [["a"], ["b"]], id="CRLF"),
        pytest.param([b"data: a\rb\n\n"], [["a"]], id="CR inside"),
        pytest.param([BOM + b"data: a\n\n"], [["a"]], id="after a BOM"),
    ],
)
def test_whole_blocks_decode_as_the_general_path_does(chunks: list[bytes], expected: list[list[str | None]]) -> None:
    results, error, discarded = feed_each(chunks)
    assert [[event.data for event in events] for events in results[:-1]] == expected
    assert b"".join(event.raw for events in results for event in events) == b"".join(chunks).removeprefix(BOM)
    assert error is None and discarded == 0


def test_whole_openai_chunks_skip_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def general_path(decoder: SSEDecoder, chunk: bytes) -> list[SSEEvent]:
        raise AssertionError(f"general path taken for {chunk!r}")

    monkeypatch.setattr(SSEDecoder, "_read", general_path)
    decoder = SSEDecoder()
    for chunk in [
        openai_chunk({"role": "assistant", "content": ""}),
        openai_chunk({"content": "é 👋"}),
        b"data: [DONE]\n\n",
    ]:
        assert decoder.feed(chunk) == [SSEEvent(chunk, chunk.removeprefix(b"data: ").removesuffix(b"\n\n").decode())]


def test_whole_block_after_other_fields_of_its_block() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b": note\nevent: e\nid: 7\nretry: 50\n") == []
    assert decoder.feed(b"data: x\n\n") == [
        SSEEvent(b": note\nevent: e\nid: 7\nretry: 50\ndata: x\n\n", "x", "e", "7", 50, (" note",))
    ]
    assert decoder.feed(b"data: y\n\n") == [SSEEvent(b"data: y\n\n", "y")]


def test_whole_comment_and_field_blocks() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b": ping\n\n") == [SSEEvent(b": ping\n\n", None, comments=(" ping",))]
    assert decoder.feed(b"event: e\n\n") == [SSEEvent(b"event: e\n\n", None, event="e")]
    assert decoder.feed(b"data: x\n\n") == [SSEEvent(b"data: x\n\n", "x")]


def test_whole_block_with_invalid_utf8_is_repaired_alone() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: \xff \xe2\x82\n\n") == [SSEEvent("data: \ufffd \ufffd\n\n".encode(), "\ufffd \ufffd")]
    assert decoder.feed(b"data: \xe2\x82\xac\n\n") == [SSEEvent("data: \u20ac\n\n".encode(), "\u20ac")]


def test_whole_block_over_the_cap_raises() -> None:
    block = b"data: 12345\n\n"
    assert SSEDecoder(max_event_bytes=len(block)).feed(block) == [SSEEvent(block, "12345")]
    decoder = SSEDecoder(max_event_bytes=len(block) - 1)
    with pytest.raises(SSEError, match=f"event exceeds {len(block) - 1} bytes"):
        decoder.feed(block)
    with pytest.raises(SSEError, match="already failed"):
        decoder.feed(b"data: 1\n\n")


# Streams made mostly of whole data blocks, with some of everything else, some of it malformed.
text_pieces = st.sampled_from([b"x", b'{"a": 1}', b" ", b":", "\u00e9".encode(), "\U0001f44b".encode()])
odd_pieces = st.sampled_from([b"\xff", b"\xe2\x82", b"\r", b"\n", b"\x00"])
text_values = st.lists(text_pieces | st.text(max_size=2).map(str.encode), max_size=4).map(b"".join)
field_values = text_values | st.lists(text_pieces | odd_pieces, max_size=4).map(b"".join)
data_names = st.sampled_from([b"data: ", b"data: ", b"data:", b"data:  ", b"data"])
field_names = data_names | st.sampled_from([b"event: ", b"id: ", b"retry: ", b": ", b"x: "])
line_ends = st.sampled_from([b"\n", b"\n", b"\n", b"\r\n", b"\r"])
lines = st.tuples(field_names, field_values, line_ends).map(b"".join)
data_blocks = st.tuples(data_names, field_values, st.just(b"\n\n")).map(b"".join)
other_blocks = st.tuples(st.lists(lines, max_size=3).map(b"".join), line_ends).map(b"".join)
any_blocks = st.sampled_from([data_blocks, data_blocks, data_blocks, other_blocks, line_ends]).flatmap(
    lambda kind: kind
)
stream_starts = st.sampled_from([b"", b"", BOM, BOM[:2]])


@settings(max_examples=400, deadline=None)
@given(
    start=stream_starts,
    blocks=st.lists(any_blocks, max_size=10),
    end=st.sampled_from([b"", b"data: cut"]),
    max_event_bytes=st.sampled_from([MAX_EVENT_BYTES, MAX_EVENT_BYTES, 10, 20]),
    data=st.data(),
)
def test_any_stream_decodes_as_the_general_path_does(
    start: bytes, blocks: list[bytes], end: bytes, max_event_bytes: int, data: st.DataObject
) -> None:
    stream = start + b"".join(blocks) + end
    # Cuts at block boundaries make chunks of exactly one block, which is what the fast path takes.
    boundaries = [len(start) + offset for offset in accumulate(len(block) for block in blocks)]
    cuts = {cut for cut in boundaries if data.draw(st.sampled_from([True, True, True, False]))}
    cuts.update(data.draw(st.lists(st.integers(0, len(stream)), max_size=3)))
    edges = [0, *sorted(cuts), len(stream)]
    chunks = [stream[low:high] for low, high in pairwise(edges)]

    results, error, discarded = feed_each(chunks, max_event_bytes)

    # One byte per feed never looks like a whole block.
    bytewise = SSEDecoder(max_event_bytes=max_event_bytes)
    bytewise_results = [outcome(bytewise, stream[index : index + 1]) for index in range(len(stream))]
    bytewise_results.append(outcome(bytewise, None))
    bytewise_events = [event for result in bytewise_results if not isinstance(result, str) for event in result]
    bytewise_error = next((result for result in bytewise_results if isinstance(result, str)), None)
    events = [event for result in results for event in result]
    assert error == bytewise_error
    if error is None:
        assert (events, discarded) == (bytewise_events, bytewise.discarded)
    else:
        # A chunk that fails loses the blocks it completed before the failing one.
        assert events == bytewise_events[: len(events)]


# Encoder


def test_encode_event_layout() -> None:
    assert encode_event("hello") == b"data: hello\n\n"
    assert encode_event("") == b"data: \n\n"
    assert encode_event("a\nb", event="message", id="7") == b"event: message\nid: 7\ndata: a\ndata: b\n\n"


def test_encode_event_splits_data_on_every_line_break() -> None:
    encoded = encode_event("a\nb\r\nc\rd\r\n")
    assert encoded == b"data: a\ndata: b\ndata: c\ndata: d\ndata: \n\n"
    assert feed_all_ways(SSEDecoder, encoded) == [SSEEvent(encoded, "a\nb\nc\nd\n")]


def test_encode_event_strips_line_breaks_from_event_and_id() -> None:
    encoded = encode_event("x", event="done\n\ndata: forged", id="1\r\nretry: 5\r")
    assert encoded == b"event: donedata: forged\nid: 1retry: 5\ndata: x\n\n"
    events = feed_all_ways(SSEDecoder, encoded)
    assert events == [SSEEvent(encoded, "x", event="donedata: forged", id="1retry: 5")]


def test_encode_event_never_emits_a_bom() -> None:
    encoded = encode_event("\ufeffhi")
    assert not encoded.startswith(BOM)
    assert dispatched(feed_all_ways(SSEDecoder, encoded)) == ["\ufeffhi"]


def test_encode_comment() -> None:
    assert encode_comment("keepalive") == b": keepalive\n\n"
    assert encode_comment("") == b":\n\n"
    encoded = encode_comment("two\nlines\r\rend")
    assert encoded == b": two\n: lines\n:\n: end\n\n"
    assert feed_all_ways(SSEDecoder, encoded) == [SSEEvent(encoded, None, comments=(" two", " lines", "", " end"))]


# Property: whatever the chunking, encoded events decode to what was encoded

event_fields = st.tuples(st.text(), st.none() | st.text(), st.none() | st.text())


@given(blocks=st.lists(event_fields | st.text(), max_size=8), data=st.data())
def test_encoded_events_survive_any_chunking(
    blocks: list[tuple[str, str | None, str | None] | str], data: st.DataObject
) -> None:
    expected: list[tuple[str | None, str | None, str | None]] = []
    stream = b""
    for block in blocks:
        if isinstance(block, str):
            stream += encode_comment(block)
            expected.append((None, None, None))
            continue
        text, event, event_id = block
        stream += encode_event(text, event=event, id=event_id)
        clean_event = None if event is None else re.sub("[\r\n]", "", event)
        clean_id = None if event_id is None else re.sub("[\r\n]", "", event_id)
        if clean_id is not None and "\0" in clean_id:
            clean_id = None
        expected.append((re.sub("\r\n?", "\n", text), clean_event, clean_id))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[start:end] for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    decoder = SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)] + decoder.close()
    assert [(event.data, event.event, event.id) for event in events] == expected
    assert b"".join(event.raw for event in events) == stream
    assert decoder.discarded == 0
