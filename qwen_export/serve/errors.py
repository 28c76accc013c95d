"""OpenAI's error JSON (``{"error": {"message", "type", "param", "code"}}``) with its HTTP status."""

from __future__ import annotations

import enum
from typing import Any

from qwen_export.errors import ContextLengthError, QwenExportError

__all__ = ["APIError", "ErrorType"]


class ErrorType(str, enum.Enum):
    INVALID_REQUEST = "invalid_request_error"
    AUTHENTICATION = "authentication_error"
    RATE_LIMIT = "rate_limit_error"
    UNAVAILABLE = "service_unavailable_error"
    SERVER = "server_error"


class APIError(Exception):
    """An error answered to the client: its status and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: ErrorType = ErrorType.INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind.value, "param": self.param, "code": self.code}}

    @classmethod
    def bad_request(cls, message: str, param: str | None = None, code: str | None = None) -> APIError:
        return cls(400, message, ErrorType.INVALID_REQUEST, param, code)

    @classmethod
    def from_exception(cls, exc: BaseException, prompt_param: str = "messages") -> APIError:
        """A deliberate error of the runtime (bad option, prompt over the context: ``prompt_param``
        named) is the client's: 400; anything else is the server's: 500."""
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, ContextLengthError):
            return cls.bad_request(str(exc), prompt_param, "context_length_exceeded")
        if isinstance(exc, QwenExportError):
            return cls.bad_request(str(exc))
        one_line = " ".join(f"{type(exc).__name__}: {exc}".split())
        return cls(500, f"internal error: {one_line}", ErrorType.SERVER)
