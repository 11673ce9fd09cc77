"""Helpers shared by the test modules."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from guardrail.core.sse import SSEDecoder, SSEEvent
from guardrail.exceptions import SSEError


def decode_all_ways(make_decoder: Callable[[], SSEDecoder], data: bytes) -> tuple[list[SSEEvent], int]:
    """Decode ``data`` whole, one byte at a time, and split in two at every index.

    Asserts that every chunking gives the same events and the same ``discarded`` count.

    Returns:
        The events (close() included) and the decoder's ``discarded`` count.
    """
    expected = _decode(make_decoder(), [data])
    byte_by_byte = _decode(make_decoder(), [data[i : i + 1] for i in range(len(data))])
    assert byte_by_byte == expected, "fed one byte at a time"
    for index in range(len(data) + 1):
        split = _decode(make_decoder(), [data[:index], data[index:]])
        assert split == expected, f"split at index {index}"
    return expected


def feed_all_ways(make_decoder: Callable[[], SSEDecoder], data: bytes) -> list[SSEEvent]:
    """Decode ``data`` whole, byte by byte and split at every index; assert all agree; return the events."""
    events, _ = decode_all_ways(make_decoder, data)
    return events


def fail_all_ways(make_decoder: Callable[[], SSEDecoder], data: bytes) -> str:
    """Assert that decoding ``data`` raises the same SSEError however it is chunked; return its message."""
    expected = _error_message(make_decoder(), [data])
    assert _error_message(make_decoder(), [data[i : i + 1] for i in range(len(data))]) == expected
    for index in range(len(data) + 1):
        assert _error_message(make_decoder(), [data[:index], data[index:]]) == expected, f"split at {index}"
    return expected


def _decode(decoder: SSEDecoder, chunks: Iterable[bytes]) -> tuple[list[SSEEvent], int]:
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    events += decoder.close()
    return events, decoder.discarded


def _error_message(decoder: SSEDecoder, chunks: Iterable[bytes]) -> str:
    try:
        _decode(decoder, chunks)
    except SSEError as error:
        return str(error)
    raise AssertionError("no SSEError raised")
