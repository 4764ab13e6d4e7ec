"""OpenAI's error shape, raised anywhere and rendered by the app."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error that becomes `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def not_found(response_id: str) -> APIError:
    return APIError(
        404, f"Response with id '{response_id}' not found.", param="response_id", code="not_found"
    )


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model '{model}' does not exist.", param="model", code="model_not_found"
    )


def previous_not_found(response_id: str) -> APIError:
    """A `previous_response_id` this caller cannot continue from (docs/contract.md §5.4, §7)."""
    return APIError(
        404,
        f"Previous response with id '{response_id}' not found.",
        param="previous_response_id",
        code="previous_response_not_found",
    )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def server_error(message: str = "The server had an error processing your request.") -> APIError:
    return APIError(500, message, type="server_error", code="server_error")


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="service_unavailable")


def insufficient_storage(retry_after: int = 5) -> APIError:
    """The store cannot write (its disk is full): nothing was created; retry later."""
    return APIError(
        507,
        "The server is out of storage; retry later.",
        type="server_error",
        code="insufficient_storage",
        headers={"retry-after": str(retry_after), "x-should-retry": "true"},
    )
