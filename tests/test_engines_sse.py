"""The upstream engines' SSE parser (tether.engines.sse): the format, whatever the reads."""

from __future__ import annotations

import pytest

from tether.engines.sse import MAX_EVENT_BYTES, SSEError, SSEParser

STREAM = (
    b"\xef\xbb\xbf: a comment\n"
    b'data: {"a": 1}\n\n'
    b"event: delta\r\ndata: one\r\ndata:two\r\n\r\n"
    b"id: 7\nretry: 10\n\n"  # no data: not an event
    b"event: ping\n\n"  # likewise
    b"data\rdata: [DONE]\r\r"
    b'data: {"b": 2}\n\n\n'
    b"data: not finished"
)
EVENTS = [
    ("", b'{"a": 1}'),
    ("delta", b"one\ntwo"),
    ("", b"\n[DONE]"),
    ("", b'{"b": 2}'),
]


def parse(chunks: list[bytes]) -> list[tuple[str, bytes]]:
    parser = SSEParser()
    return [event for chunk in chunks for event in parser.feed(chunk)]


def test_events_of_a_whole_stream() -> None:
    assert parse([STREAM]) == EVENTS


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13])
def test_events_whatever_the_reads(size: int) -> None:
    """Reads that split a BOM, a CRLF or a field anywhere give the same events."""
    assert parse([STREAM[i : i + size] for i in range(0, len(STREAM), size)]) == EVENTS


def test_a_bom_only_at_the_start() -> None:
    assert parse([b"data: \xef\xbb\xbfx\n\n"]) == [("", b"\xef\xbb\xbfx")]
    assert parse([b"\xef", b"\xbb", b"\xbfdata: x\n\n"]) == [("", b"x")]


def test_an_event_that_never_ends_is_bounded() -> None:
    parser = SSEParser()
    parser.feed(b"data: " + b"x" * (MAX_EVENT_BYTES - 6))
    with pytest.raises(SSEError):
        parser.feed(b"x")
