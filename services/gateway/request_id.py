"""X-Request-Id: one id per HTTP request, the caller's or the gateway's, on the response and in the records.

An application that logs the id it sent (or the one it got back: the `openai` SDK shows it as `_request_id`)
can find that request's completion records on Kafka and in the store, and the gateway's log lines about it.
"""

from __future__ import annotations

import re
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse

from services.gateway.asgi import HttpMiddleware
from services.gateway.errors import ApiError

HEADER = "x-request-id"
MAX_CHARS = 128
# Visible ASCII only: the id goes back out as a header and into log lines, where a space, a control character
# or a line break could forge fields.
_VALID = re.compile(rb"[!-~]{1,%d}" % MAX_CHARS)
_HEADER_BYTES = HEADER.encode()


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def request_id(request: Request) -> str:
    """The id RequestIds gave this request (a fresh one for a request that did not pass through it)."""
    return request.scope.get("state", {}).get("request_id") or new_request_id()


class RequestIds(HttpMiddleware):
    """Takes the caller's X-Request-Id (400 naming the header if it is not 1-128 visible ASCII characters) or
    makes one, keeps it in the request's state and adds it to the response's headers."""

    async def http(self, scope, receive, send) -> None:
        given = next((value for name, value in scope["headers"] if name == _HEADER_BYTES), None)
        if given is not None and not _VALID.fullmatch(given):
            err = ApiError(400, f"The X-Request-Id header must be 1 to {MAX_CHARS} visible ASCII characters "
                                "(no spaces).", param="X-Request-Id", code="invalid_request_id")
            refusal = JSONResponse(err.body(), status_code=400, headers={HEADER: new_request_id()})
            await refusal(scope, receive, send)
            return
        rid = given.decode() if given is not None else new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        header = (_HEADER_BYTES, rid.encode())

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        await self.app(scope, receive, send_with_id)

