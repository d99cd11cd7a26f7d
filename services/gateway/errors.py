"""Errors in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import grpc

from alignloop.contracts import PARAM_METADATA_KEY
from services.gateway.protocol import ErrorInfo, ErrorResponse


class ApiError(Exception):
    def __init__(
        self, status_code: int, message: str, type_: str = "invalid_request_error",
        param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None, **extra: str,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.extra = extra  # alignloop's own fields beside OpenAI's four, e.g. run_id
        self.headers = headers  # e.g. Retry-After

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code, **self.extra)
        return ErrorResponse(error=info).model_dump()


_RPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


def from_rpc_error(exc: grpc.aio.AioRpcError, service: str = "policy service") -> ApiError:
    """The HTTP error for a failed call; a 5xx names `service`, the backend that failed."""
    status, type_ = _RPC_TO_HTTP.get(exc.code(), (502, "api_error"))
    param = dict(exc.trailing_metadata() or ()).get(PARAM_METADATA_KEY)
    message = exc.details() or exc.code().name
    if status >= 500:
        message = f"{service}: {message}"
    return ApiError(status, message, type_, param=param)
