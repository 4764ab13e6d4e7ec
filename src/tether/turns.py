"""A conversation turn: the one shape a turn has from request parsing to the engine.

Input items (the wire format) become `Message`s in `wire_items.history`; the run spec
(`tether.runspec`) keeps them, `tether.context` fits them to the model's context, and
engines are given them. Stored, or sealed into a compaction token, a turn is the JSON
`encode` makes: `{"role", "text"}`, plus `tool_calls` (`{"call_id", "name",
"arguments"}`) on an assistant turn that called tools, `call_id` on a `tool` turn and
`parts` on a turn with images, `reasoning` on an assistant turn the model thought
before (`{"text", "summary"?, "upstream"?}`, see `Thought`) — the shape records written by
every earlier version hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tether import seal

#: the kind of a reasoning item's `encrypted_content` (`tether.seal`)
SEALED_THOUGHT = "tr1"


@dataclass(slots=True)
class ToolCallSpec:
    """A function call the model made earlier in the conversation."""

    call_id: str
    name: str
    arguments: str


@dataclass(slots=True)
class Thought:
    """The model's thinking before an assistant turn (a reasoning item of the
    conversation). Chat upstreams get `text` back on the assistant message
    (`reasoning_content`); Responses upstreams get a reasoning item, with their own
    `upstream` item fields (`id`, `encrypted_content`) when they gave them."""

    text: str
    summary: list[str] = field(default_factory=list)
    #: the upstream's own reasoning item fields (`id`, `encrypted_content`), if any
    upstream: dict[str, str] | None = None

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text}
        if self.summary:
            out["summary"] = self.summary
        if self.upstream:
            out["upstream"] = self.upstream
        return out

    @classmethod
    def decode(cls, data: dict[str, Any]) -> Thought:
        return cls(data.get("text") or "", list(data.get("summary") or ()), data.get("upstream"))

    def seal(self) -> str:
        """The item's `encrypted_content`: this thought, sealed with the install's key."""
        return seal.seal(SEALED_THOUGHT, self.encode())

    @classmethod
    def unseal(cls, token: str) -> Thought:
        """The thought an `encrypted_content` carries; ValueError if this install did not
        seal it (or it was altered)."""
        data = seal.unseal(SEALED_THOUGHT, token, "encrypted reasoning content")
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise ValueError("the encrypted reasoning content is corrupt")
        return cls.decode(data)


@dataclass(slots=True)
class Message:
    """One turn. `tool` turns carry a function call's output for `call_id`; assistant
    turns may carry the function calls the model made (`tool_calls`)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    text: str
    tool_calls: list[ToolCallSpec] = field(default_factory=list)
    call_id: str | None = None
    #: a user turn with images, in order: `{"type": "text", "text"}` and
    #: `{"type": "image", "url", "detail"}`; `text` then has a placeholder for each image,
    #: for engines that cannot see them. None: the turn is `text` alone.
    parts: list[dict[str, Any]] | None = None
    #: an assistant turn's thinking, in order (reasoning items before it)
    reasoning: list[Thought] = field(default_factory=list)


def encode(messages: list[Message]) -> list[dict[str, Any]]:
    """Turns as JSON-ready dicts; keys with nothing to say are left out (as stored so far)."""
    return [_encode(m) for m in messages]


def decode(turns: list[dict[str, Any]]) -> list[Message]:
    """Turns `encode` made (or any earlier version stored) as `Message`s."""
    return [
        Message(
            t["role"],
            t["text"],
            [
                ToolCallSpec(c["call_id"], c["name"], c["arguments"])
                for c in t.get("tool_calls", ())
            ],
            t.get("call_id"),
            t.get("parts"),
            [Thought.decode(r) for r in t.get("reasoning", ())],
        )
        for t in turns
    ]


def _encode(m: Message) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": m.role, "text": m.text}
    if m.tool_calls:
        turn["tool_calls"] = [
            {"call_id": c.call_id, "name": c.name, "arguments": c.arguments} for c in m.tool_calls
        ]
    if m.call_id is not None:
        turn["call_id"] = m.call_id
    if m.parts is not None:
        turn["parts"] = m.parts
    if m.reasoning:
        turn["reasoning"] = [r.encode() for r in m.reasoning]
    return turn
