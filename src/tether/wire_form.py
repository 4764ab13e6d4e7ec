"""`application/x-www-form-urlencoded` create bodies, as the JSON body they stand for.

The Open Responses spec accepts form bodies for `POST /responses` and gives no encoding
rules, so tether's are: a field's text is typed by the top-level schema of
CreateResponseBody (booleans `true`/`false`, integers, numbers); an object or array is
either a JSON text (`tools=[{...}]`, `input=[{...}]`, `text={"format":...}`) or bracket
notation with string leaves (`metadata[k]=v`, `input[0][role]=user`, `a[]=v` appends).
The result is then validated exactly like a JSON body.
"""

from __future__ import annotations

import itertools
import re
from typing import Any
from urllib.parse import parse_qsl

import orjson

from tether.errors import bad_request

_FORM_BOOL = {"stream", "background", "store", "parallel_tool_calls"}
_FORM_INT = {"max_output_tokens", "max_tool_calls", "top_logprobs"}
_FORM_FLOAT = {"temperature", "top_p", "presence_penalty", "frequency_penalty"}
_JSON_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_FORM_TEXT = {
    "model",
    "instructions",
    "previous_response_id",
    "service_tier",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "truncation",
}


def parse_form(raw: bytes) -> dict[str, Any]:
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        if not raw.strip():
            return {}
        raise bad_request(
            "The request body is not valid form data.", None, "invalid_body"
        ) from None
    body: dict[str, Any] = {}
    for key, text in pairs:
        name, _, rest = key.partition("[")
        if rest:
            _put(body, name, [p.rstrip("]") for p in ("[" + rest).split("[")[1:]], text, key)
        elif name in body:
            raise bad_request(f"Parameter '{name}' is given twice.", name, "invalid_value")
        else:
            body[name] = _form_value(name, text)
    return body


def _form_value(name: str, text: str) -> Any:
    # Numbers as JSON writes them: Python's int()/float() also take `1_0`, ` 1` and `nan`.
    try:
        if name in _FORM_BOOL and text in ("true", "false"):
            return text == "true"
        if name in _FORM_INT and _JSON_INT.fullmatch(text):
            return int(text)
        if name in _FORM_FLOAT and _JSON_NUMBER.fullmatch(text):
            return float(text)
    except ValueError:
        return text  # refused by the JSON rules, naming the parameter
    if name not in _FORM_TEXT and text.startswith(("{", "[")):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            raise bad_request(f"Invalid '{name}': not valid JSON.", name, "invalid_value") from None
    return text


def _put(body: dict[str, Any], name: str, path: list[str], text: str, key: str) -> None:
    """Bracket notation: `a[b][0]=v` is `{"a": {"b": ["v"]}}`; `a[]=v` appends."""
    node: Any = body
    keys: list[str | int] = [name, *(int(p) if p.isdigit() else p for p in path)]
    for here, below in itertools.pairwise(keys):
        node = _child(node, here, [] if isinstance(below, int) or below == "" else {}, key)
    _set(node, keys[-1], text, key)


def _child(node: Any, key: str | int, empty: Any, full: str) -> Any:
    if isinstance(node, list) and (key == "" or key == len(node)):
        node.append(empty)
        return node[-1]
    if isinstance(node, list) and isinstance(key, int) and key < len(node):
        found = node[key]
    elif isinstance(node, dict) and isinstance(key, str) and key:
        found = node.setdefault(key, empty)
    else:
        raise bad_request(f"Invalid form field '{full}'.", full, "invalid_value")
    if type(found) is not type(empty):
        raise bad_request(f"Invalid form field '{full}'.", full, "invalid_value")
    return found


def _set(node: Any, key: str | int, text: str, full: str) -> None:
    if isinstance(node, list) and (key == "" or key == len(node)):
        node.append(text)
    elif isinstance(node, dict) and isinstance(key, str) and key and key not in node:
        node[key] = text
    else:
        raise bad_request(f"Invalid form field '{full}'.", full, "invalid_value")
