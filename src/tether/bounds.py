"""Limits on what a request may be: query parameters parsed strictly and range-checked,
body nesting depth, and a digest of a body that cannot fail however the body is shaped.

Everything here refuses with a 400 in OpenAI's shape naming the parameter, before any of
the request reaches the store (SQLite's INTEGER is 64-bit: a larger `starting_after` used
to end a stream with an `OverflowError`; Python's `int()` takes `1_0`, ` 1` and `+1`).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, NoReturn

from tether.errors import bad_request

# Objects and arrays nested in a request body, the body itself being level 1. Real requests
# stay far below (a structured-output schema: OpenAI allows 10 levels of nesting, ~20 of
# JSON); deeper bodies exhausted recursion in the encoders (a 500 while hashing a body).
MAX_DEPTH = 64
INT64_MAX = 2**63 - 1  # the largest integer a store column holds
MAX_HEADER_PARAM = 255  # characters of a stored header value (Stripe's idempotency keys)
_DIGITS = re.compile(r"[0-9]{1,19}")  # plain decimal digits only: no sign, `_` or spaces
_TRUE = ("true", "1")
_FALSE = ("false", "0")


def int_param(raw: str | None, name: str, default: int, low: int = 0, high: int = INT64_MAX) -> int:
    """A query parameter that is an integer in [low, high] (`default` when absent)."""
    if raw is None:
        return default
    if _DIGITS.fullmatch(raw) and low <= (value := int(raw)) <= high:
        return value
    raise bad_request(
        f"Invalid '{name}': expected an integer from {low} to {high}.", name, "invalid_value"
    )


def bool_param(raw: str | None, name: str, default: bool = False) -> bool:
    """A query parameter that is a boolean: `true`/`false` (what the SDK sends) or 1/0."""
    if raw is None:
        return default
    text = raw.lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise bad_request(f"Invalid '{name}': expected 'true' or 'false'.", name, "invalid_value")


def header_param(raw: str | None, name: str, longest: int = MAX_HEADER_PARAM) -> str | None:
    """A header the server stores (`Idempotency-Key`): at most `longest` characters."""
    if raw is not None and len(raw) > longest:
        raise bad_request(f"Invalid '{name}': at most {longest} characters.", name, "invalid_value")
    return raw


def check_depth(body: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse a body with objects/arrays nested deeper than `limit` (iterative: a body of
    any depth is walked without recursion). The error names the top-level parameter."""
    stack: list[tuple[Any, int, str | None]] = [(body, 1, None)]
    while stack:
        node, depth, top = stack.pop()
        if isinstance(node, dict):
            children: Any = node.items()
        elif isinstance(node, list):
            children = ((top, v) for v in node)
        else:
            continue
        if depth > limit:
            too_deep(top, limit)
        for key, value in children:
            if isinstance(value, dict | list):
                stack.append((value, depth + 1, key if top is None else top))


def too_deep(param: str | None, limit: int = MAX_DEPTH) -> NoReturn:
    raise bad_request(
        f"The request body is nested too deeply: at most {limit} levels of "
        "JSON objects and arrays.",
        param,
        "nesting_too_deep",
    )


def digest(body: Any) -> str:
    """SHA-256 of a canonical encoding of a JSON-like value (sorted keys): iterative, and
    any scalar encodes (integers of any size, non-finite floats), so it cannot fail."""
    h = hashlib.sha256()
    stack: list[Any] = [body]
    while stack:
        node = stack.pop()
        if isinstance(node, _Token):
            h.update(node.text)
        elif isinstance(node, dict):
            h.update(b"{")
            stack.append(_CLOSE_OBJECT)
            for key in sorted(node, key=str, reverse=True):
                stack += [_COMMA, node[key], _Token(_scalar(str(key)) + b":")]
        elif isinstance(node, list | tuple):
            h.update(b"[")
            stack.append(_CLOSE_ARRAY)
            for value in reversed(node):
                stack += [_COMMA, value]
        else:
            h.update(_scalar(node))
    return h.hexdigest()


class _Token:
    __slots__ = ("text",)

    def __init__(self, text: bytes) -> None:
        self.text = text


_CLOSE_OBJECT = _Token(b"}")
_CLOSE_ARRAY = _Token(b"]")
_COMMA = _Token(b",")


def _scalar(value: Any) -> bytes:
    if isinstance(value, int) and not isinstance(value, bool):
        return hex(value).encode()  # str() of an int has a digit limit; hex() has none
    if isinstance(value, float | str | bool) or value is None:
        return json.dumps(value).encode()  # NaN and inf included
    return json.dumps(repr(value)).encode()  # never in a parsed body; still no failure
