"""The base of the gateway's pure ASGI middlewares (Starlette's BaseHTTPMiddleware would buffer streams)."""

from __future__ import annotations


class HttpMiddleware:
    """Passes lifespan and websocket scopes through untouched; subclasses handle HTTP in `http`."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope, receive, send) -> None:
        raise NotImplementedError
