"""Splitting `<think>…</think>` out of a chat upstream's `content`, for servers that
stream a reasoning model's thinking inline (no reasoning parser).

Tags may be split across chunks: a chunk's tail that could be the start of a tag is held
back until the next chunk says. Token accounting (`Splitter.steps`): a chunk is one token
step; its token goes to the first step the chunk yields, and a chunk that yields none (a
tag, a held-back piece) hands its token to the next step, so the steps' tokens add up to
the chunks (`ChatEngine` reports the chunk count at the end, covering a trailing tag).

`opened` (an upstream's `think_tags = "open"`): the prompt already opened the thinking
(DeepSeek-R1's template ends with `<think>\n`), so the stream starts inside it and only
`</think>` comes. A stream that opens `<think>` anyway (another version of the template)
has that leading tag dropped. A reply with no `</think>` at all is thinking throughout:
the mode must match the model's template.
"""

from __future__ import annotations

from tether.engines.base import Delta, ReasoningDelta

OPEN, CLOSE = "<think>", "</think>"


def _held(text: str, tag: str) -> int:
    """How many characters at the end of `text` could begin `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class Splitter:
    __slots__ = ("buffer", "lead", "owed", "thinking")

    def __init__(self, opened: bool = False) -> None:
        self.buffer = ""  # text held back: it may be the start of a tag
        self.thinking = opened
        self.lead = opened  # at the start of an opened stream: a `<think>` is dropped
        self.owed = 0  # tokens of chunks that yielded no step yet

    def steps(self, text: str, tokens: int = 1) -> list[Delta | ReasoningDelta]:
        """The steps of one content chunk."""
        self.owed += tokens
        self.buffer += text
        if self.lead:
            start = self.buffer.lstrip()
            if start.startswith(OPEN):
                self.buffer, self.lead = start[len(OPEN) :], False
            elif OPEN.startswith(start):
                return []  # whitespace or the start of a tag so far: wait
            else:
                self.lead = False
        pieces: list[tuple[bool, str]] = []
        while True:
            tag = CLOSE if self.thinking else OPEN
            at = self.buffer.find(tag)
            if at < 0:
                keep = _held(self.buffer, tag)
                cut = len(self.buffer) - keep
                pieces.append((self.thinking, self.buffer[:cut]))
                self.buffer = self.buffer[cut:]
                break
            pieces.append((self.thinking, self.buffer[:at]))
            self.buffer = self.buffer[at + len(tag) :]
            self.thinking = not self.thinking
        return self._emit(pieces)

    def end(self) -> list[Delta | ReasoningDelta]:
        """At the end of the stream: what was held back is text after all."""
        rest, self.buffer = self.buffer, ""
        return self._emit([(self.thinking, rest)])

    def _emit(self, pieces: list[tuple[bool, str]]) -> list[Delta | ReasoningDelta]:
        out: list[Delta | ReasoningDelta] = []
        for thinking, text in pieces:
            if not text:
                continue
            tokens, self.owed = self.owed, 0
            out.append(ReasoningDelta(text, tokens) if thinking else Delta(text, tokens))
        return out
