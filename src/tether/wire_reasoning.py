"""The reasoning output item: a model's thinking and its summary, as a run streams them
(`wire_output` replays them from a log)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tether.turns import Thought
from tether.wire_input import new_id


@dataclass(slots=True)
class ReasoningItem:
    """The model's thinking: one `reasoning_text` part, and the summary parts of an
    upstream that summarizes.

    Its deltas are OpenAI's `response.reasoning_text.delta/done` (what the SDKs and
    Codex read); Open Responses names the same events `response.reasoning.delta/done`
    with the same fields. The text part is announced with `content_part.added/done`
    (both specs allow it for `reasoning_text`) when the first thinking arrives, so an
    item of summaries alone has no empty part. Summary parts use the
    `response.reasoning_summary_part.*` and `response.reasoning_summary_text.*` events
    (one name in both specs). `sealed` (`include: ["reasoning.encrypted_content"]`): the
    finished item carries `encrypted_content`, the thinking sealed with the install's
    key (`Thought.seal`), which tether reads back when a client sends the item back."""

    output_index: int = 0
    id: str = field(default_factory=lambda: new_id("rs"))
    text: list[str] = field(default_factory=list)
    sealed: bool = False
    part: bool = False  # the `reasoning_text` part was announced
    summary: list[list[str]] = field(default_factory=list)  # summary parts' texts
    summary_open: bool = False  # the last summary part is not closed yet
    #: the upstream's own item fields (`ReasoningSource`), sealed with the thinking
    upstream: dict[str, str] | None = None

    def item(self, status: str) -> dict[str, Any]:
        live = status == "in_progress"
        out = {
            "id": self.id,
            "type": "reasoning",
            "status": status,
            "summary": [] if live else self.summaries(),
            "content": [] if live or not self.part else [self.part_()],
        }
        if self.sealed and not live:
            out["encrypted_content"] = self.thought().seal()
        return out

    def thought(self) -> Thought:
        return Thought(
            "".join(self.text), ["".join(t) for t in self.summary], self.upstream or None
        )

    def part_(self) -> dict[str, Any]:
        return {"type": "reasoning_text", "text": "".join(self.text)}

    def summaries(self) -> list[dict[str, Any]]:
        return [{"type": "summary_text", "text": "".join(t)} for t in self.summary]

    def opened(self) -> list[dict[str, Any]]:
        return [
            {
                "type": "response.output_item.added",
                "output_index": self.output_index,
                "item": self.item("in_progress"),
            }
        ]

    def thinking(self, text: str) -> list[dict[str, Any]]:
        """The events of a piece of thinking (the part announced first)."""
        events = [] if self.part else [self._part_added()]
        self.part = True
        return [*events, self.delta(text)]

    def _part_added(self) -> dict[str, Any]:
        return {
            "type": "response.content_part.added",
            "item_id": self.id,
            "output_index": self.output_index,
            "content_index": 0,
            "part": {"type": "reasoning_text", "text": ""},
        }

    def delta(self, text: str) -> dict[str, Any]:
        self.text.append(text)
        return {
            "type": "response.reasoning_text.delta",
            "item_id": self.id,
            "output_index": self.output_index,
            "content_index": 0,
            "delta": text,
        }

    def undo(self, part: bool) -> None:
        """Take back the last `thinking` (it never reached the log); `part`: whether the
        part was announced before it."""
        self.text.pop()
        self.part = part

    def summary_delta(self, part: int, text: str) -> list[dict[str, Any]]:
        """The events of a piece of summary part `part`: earlier parts are closed, and
        the part opened, first. (Parts are taken in order; a lower index than the last
        part's is the last part.)"""
        events: list[dict[str, Any]] = []
        while len(self.summary) <= part:
            events += self._summary_closed()
            self.summary.append([])
            self.summary_open = True
            events.append(self._summary_event("part.added", "part", ""))
        self.summary[-1].append(text)
        events.append(self._summary_event("text.delta", "delta", text))
        return events

    def undo_summary(self, parts: int, was_open: bool) -> None:
        """Take back the last `summary_delta`: the parts as they were (`parts`, `was_open`)."""
        self.summary[-1].pop()
        del self.summary[parts:]
        self.summary_open = was_open

    def _summary_event(self, kind: str, key: str, value: str) -> dict[str, Any]:
        return {
            "type": f"response.reasoning_summary_{kind}",
            "item_id": self.id,
            "output_index": self.output_index,
            "summary_index": len(self.summary) - 1,
            key: {"type": "summary_text", "text": value} if key == "part" else value,
        }

    def _summary_closed(self) -> list[dict[str, Any]]:
        if not self.summary_open:
            return []
        self.summary_open = False
        text = "".join(self.summary[-1])
        return [
            self._summary_event("text.done", "text", text),
            self._summary_event("part.done", "part", text),
        ]

    def live(self) -> dict[str, Any]:
        return self.item("in_progress") | {
            "content": [self.part_()] if self.part else [],
            "summary": self.summaries(),
        }

    def closed(self, status: str) -> list[dict[str, Any]]:
        events = self._summary_closed()
        if self.part:
            part = self.part_()
            events += [
                {
                    "type": "response.reasoning_text.done",
                    "item_id": self.id,
                    "output_index": self.output_index,
                    "content_index": 0,
                    "text": part["text"],
                },
                {
                    "type": "response.content_part.done",
                    "item_id": self.id,
                    "output_index": self.output_index,
                    "content_index": 0,
                    "part": part,
                },
            ]
        events.append(
            {
                "type": "response.output_item.done",
                "output_index": self.output_index,
                "item": self.item(status),
            }
        )
        return events
