"""Function tools and structured output on the embedded model.

SmolLM2 has no tool-calling format of its own that a 135M model keeps to, so tether
teaches one in the system prompt (`<tool_call>{"name": ..., "arguments": ...}`) and
*enforces* it while decoding:

- whether to call (`tool_choice: "auto"`): a 135M model cannot tell by itself whether a
  request needs a tool (measured: its probability of opening `<tool_call>`, and its
  answer to a yes/no question, are no better than chance on plain requests). So `auto`
  calls when the last user turn shares a content word with a tool's name or description
  (`relevant`), or when the model itself gives `<tool_call>` a high probability. After a
  tool's output `auto` answers in text: the model's own wish to call again is no better
  than chance either, and an agent (Codex) would loop on it until its context is full;
  so one call a turn, then the answer. A forced choice (`required`, a named function)
  skips the decision;
- the function's name is picked among the most relevant allowed tools by the model's
  own ranking of their tokens (a greedy walk, never a name outside `tools`);
- the arguments, and a `text.format` answer, are sampled under a llama.cpp grammar
  built from the JSON schema, so they are always valid JSON of that schema.

Everything here is pure (prompt text, grammars, the plan); `local.py` drives the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from llama_cpp.llama_grammar import json_schema_to_gbnf

from tether.engines.base import Generation, Message

MARKER = "<tool_call>"
#: what the engine writes into the context (not sampled) once it decided to call.
CALL_OPEN = '<tool_call>{"name": "'
ARGS_OPEN = ', "arguments": '
#: `tool_choice: "auto"` also calls, whatever the words, when the model gives
#: `<tool_call>`'s first token at least this probability.
CALL_THRESHOLD = 0.5

_ANY_OBJECT: dict[str, Any] = {"type": "object"}
DESCRIBED = 300  # characters of a tool's description shown to the model


@dataclass(slots=True)
class Plan:
    """What a generation may produce: `text` only, a forced `call`, or `auto` (the
    model decides). `tools` are the functions it may call; `text_schema` the JSON schema
    a text answer must follow (None: free text)."""

    kind: Literal["text", "call", "auto"]
    tools: list[dict[str, Any]] = field(default_factory=list)
    text_schema: dict[str, Any] | None = None
    #: the tools the last user turn mentions (none after a tool's output)
    relevant: list[dict[str, Any]] = field(default_factory=list)


def plan(request: Generation) -> Plan:
    tools = [
        t
        for t in request.tools
        if t.get("type", "function") == "function" and isinstance(t.get("name"), str)
    ]
    choice = request.tool_choice
    mode = "auto"
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = {t.get("name") for t in choice.get("tools") or []}
        tools = [t for t in tools if t["name"] in allowed]
        mode = choice.get("mode") or "auto"
    elif isinstance(choice, dict) and choice.get("type") == "function":
        tools = [t for t in tools if t["name"] == choice.get("name")]
        mode = "required"
    elif choice in ("none", "required"):
        mode = choice
    fmt = request.text_format
    schema: dict[str, Any] | None = None
    if fmt is not None and fmt.get("type") in ("json_schema", "json_object"):
        schema = fmt.get("schema") or _ANY_OBJECT
    if not tools or mode == "none":
        return Plan("text", [], schema)
    last = request.messages[-1] if request.messages else None
    if mode == "auto" and last is not None and last.role == "tool":
        return Plan("text", [], schema)  # one call, then the answer (see above)
    relevant = _relevant(tools, last.text) if last is not None and last.role == "user" else []
    return Plan("call" if mode == "required" else "auto", tools, schema, relevant)


_STOPWORDS = frozenset(
    re.findall(
        r"\w+",
        "a an the and or of to in on at for from by with about into is are be was were this "
        "that these those it its i you me my your we our can could would should will please "
        "what whats how which who when where why do does did get set use using run tool "
        "function call current given any all some",
    )
)


def _words(text: str) -> set[str]:
    """Content words, crudely stemmed (plural and verb endings dropped)."""
    raw = re.findall(r"[a-z]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", text).lower())
    out = set()
    for word in raw:
        if len(word) < 3 or word in _STOPWORDS:
            continue
        for suffix in ("ing", "es", "ed", "s"):
            if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                word = word[: -len(suffix)]
                break
        out.add(word)
    return out


def _relevant(tools: list[dict[str, Any]], request: str) -> list[dict[str, Any]]:
    """The tools sharing the most content words with `request` (none if none share)."""
    asked = _words(request)
    scores = [
        len(asked & _words(f"{t['name'].replace('_', ' ')} {t.get('description') or ''}"))
        for t in tools
    ]
    best = max(scores, default=0)
    return [t for t, score in zip(tools, scores, strict=True) if best and score == best]


# --- the prompt -------------------------------------------------------------------------------


def chat_messages(request: Generation, plan: Plan) -> list[dict[str, str]]:
    """The conversation as the chat template takes it (system/user/assistant turns)."""
    out = [_turn(m) for m in request.messages]
    extra = _instructions(plan)
    if extra:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{extra}"}
        else:
            out.insert(0, {"role": "system", "content": extra})
    return out


def _turn(m: Message) -> dict[str, str]:
    if m.role == "tool":
        # The model was trained on three roles: a tool's output comes back as a user turn.
        return {"role": "user", "content": f"<tool_response>\n{m.text}\n</tool_response>"}
    if m.role == "assistant" and m.tool_calls:
        calls = "".join(
            f'{CALL_OPEN}{c.name}"{ARGS_OPEN}{c.arguments or "{}"}}}</tool_call>'
            for c in m.tool_calls
        )
        return {"role": "assistant", "content": f"{m.text}\n{calls}" if m.text else calls}
    # `developer` is the Responses API's name for a system message.
    return {"role": "system" if m.role == "developer" else m.role, "content": m.text}


def _instructions(plan: Plan) -> str:
    parts = []
    if plan.tools:
        # Descriptions are cut short: an agent's (Codex's run to pages) would fill the
        # small model's context and say nothing more to a 135M model than their start.
        listed = "\n".join(
            _compact(
                {
                    "name": t["name"],
                    "description": (t.get("description") or "")[:DESCRIBED],
                    "parameters": t.get("parameters") or _ANY_OBJECT,
                }
            )
            for t in plan.tools
        )
        parts.append(
            "You can call these tools:\n<tools>\n" + listed + "\n</tools>\n"
            "When the user asks for something a tool does, reply with only "
            '<tool_call>{"name": "tool name", "arguments": {...}}</tool_call>.'
        )
    if plan.text_schema is not None:
        if plan.text_schema is _ANY_OBJECT:
            parts.append("Answer with a JSON object.")
        else:
            parts.append(
                "Answer with a JSON object that follows this JSON schema:\n"
                + _compact(plan.text_schema)
            )
    return "\n\n".join(parts)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# --- grammars ---------------------------------------------------------------------------------


def schema_grammar(schema: dict[str, Any] | None) -> str:
    """GBNF for JSON values of `schema` (any JSON object when None or not convertible)."""
    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema or _ANY_OBJECT))
    except Exception:  # a schema feature the converter lacks: any object, still JSON
        gbnf = json_schema_to_gbnf(json.dumps(_ANY_OBJECT))
    return _no_trailing_space(_strict_strings(gbnf))


def any_object_grammar() -> str:
    return schema_grammar(None)


def _no_trailing_space(gbnf: str) -> str:
    """The value ends at its last character (the converter allows a space after it,
    which costs a token and adds nothing)."""
    lines = gbnf.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("root ::= ") and line.endswith(" space"):
            lines[i] = line[: -len(" space")]
    return "\n".join(lines)


def _strict_strings(gbnf: str) -> str:
    """The converter lets string characters include raw control characters (a newline
    inside a string), which JSON forbids: exclude them."""
    return gbnf.replace('char ::= [^"\\\\]', 'char ::= [^"\\\\\\x00-\\x1F\\x7F]')
