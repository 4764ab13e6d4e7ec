"""Server-sent events parsed from the raw bytes of a network read (the upstream engines'
hot loop).

A general SSE client decodes the body to text, splits it into lines and handles each
line in Python: a dozen calls per event. An upstream's events are almost all one
`data: {...}` line; `SSEParser.feed` splits a whole read at its blank lines in C and
takes that common case without looking at lines. The rest of the format
(https://html.spec.whatwg.org/multipage/server-sent-events.html) is still honoured: CR,
LF and CRLF line ends (a CR at the end of a read waits for the next one), an initial BOM,
comments, `event:`, several `data:` lines, other fields ignored. An event is dispatched
only with at least one `data` line (as the spec says); an event still open when the body
ends is dropped (likewise).

Data stays bytes (orjson reads bytes; nothing is decoded that is not needed).
"""

from __future__ import annotations

from typing import Final

#: (event type, data); the type is "" when the event named none
Event = tuple[str, bytes]

BOM: Final = b"\xef\xbb\xbf"
#: bytes of one event at most: an upstream that never ends an event must not take the
#: whole memory
MAX_EVENT_BYTES: Final = 16 << 20


class SSEError(ValueError):
    """The stream is not one of server-sent events (an event larger than the bound)."""


class SSEParser:
    """Incremental: `feed` each network read, get the events it completed."""

    __slots__ = ("_rest", "_started")

    def __init__(self) -> None:
        self._rest = b""  # an event not complete yet
        self._started = False  # past a possible BOM

    def feed(self, chunk: bytes) -> list[Event]:
        """The events that `chunk` completes, in order."""
        buf = self._rest + chunk if self._rest else chunk
        if not self._started:
            if len(buf) < len(BOM) and BOM.startswith(buf):
                self._rest = buf  # maybe a BOM yet
                return []
            self._started = True
            if buf.startswith(BOM):
                buf = buf[len(BOM) :]
        held = b""
        if b"\r" in buf:
            if buf.endswith(b"\r"):  # its LF may be in the next read
                buf, held = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *blocks, rest = buf.split(b"\n\n")
        if len(rest) > MAX_EVENT_BYTES:
            raise SSEError(f"an event longer than {MAX_EVENT_BYTES} bytes")
        self._rest = rest + held
        out: list[Event] = []
        for block in blocks:
            if block[:6] == b"data: " and b"\n" not in block:  # the common case
                out.append(("", block[6:]))
            elif block:
                event = _event(block)
                if event is not None:
                    out.append(event)
        return out


def _event(block: bytes) -> Event | None:
    """The event of the lines between two blank lines, if it has data."""
    kind, data = "", []
    for line in block.split(b"\n"):
        name, colon, value = line.partition(b":")
        if not name and colon:
            continue  # a comment
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            kind = value.decode("utf-8", "replace")
    return (kind, b"\n".join(data)) if data else None
