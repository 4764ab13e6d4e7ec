"""Request and reply bodies shared by every route module: JSON replies, and JSON (or
form) request bodies read within the size and depth limits."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tether import bounds, wire_form
from tether.errors import APIError, bad_request


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def json_body(request: Request, limit: int) -> Any:
    """The body as JSON (or a form, as the JSON it stands for), at most `limit` bytes and
    `bounds.MAX_DEPTH` levels deep, before anything else looks at it."""
    kind = _body_kind(request)
    raw = await _read_body(request, limit)
    if kind == "application/x-www-form-urlencoded":
        body = wire_form.parse_form(raw)
    else:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if "recursion" in str(exc):  # deeper than orjson's own limit (1,024)
                bounds.too_deep(None)
            raise bad_request("The request body is not valid JSON.", None, "invalid_json") from None
    bounds.check_depth(body)
    return body


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks = []
    size = 0
    # A client that hangs up meanwhile raises starlette's ClientDisconnect: the app
    # answers it quietly (nobody is there to read it), not as an unhandled error.
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _body_kind(request: Request) -> str:
    """JSON (also when no type is given, as before), or a form (the Open Responses spec
    allows `application/x-www-form-urlencoded` create bodies); anything else is 415."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("", "application/json", "application/x-www-form-urlencoded"):
        return kind or "application/json"
    raise APIError(
        415,
        f"Unsupported Content-Type '{kind}': send application/json or "
        "application/x-www-form-urlencoded.",
        param="Content-Type",
        code="unsupported_media_type",
    )


def _too_large(limit: int) -> APIError:
    return APIError(
        413, f"The request body is larger than {limit} bytes.", code="request_too_large"
    )
