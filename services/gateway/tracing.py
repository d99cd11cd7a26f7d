"""The gateway's part of a trace (alignloop/tracing.py): a server span per HTTP request, carried on to the
backends in each gRPC call's metadata. Installed only while tracing is on, so that it costs nothing otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from opentelemetry import trace

from alignloop import tracing
from services.gateway.asgi import HttpMiddleware


# Probes and scrapes: a span every few seconds per prober, and nothing to follow into a backend.
UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})


class TracingMiddleware(HttpMiddleware):
    """One server span per HTTP request, current while the request is handled and its response (a whole
    stream included) is sent; the child of the caller's `traceparent`, if it sent one."""

    def __init__(self, app, tracer) -> None:
        super().__init__(app)
        self.tracer = tracer

    async def http(self, scope, receive, send) -> None:
        if scope["path"] in UNTRACED:
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        attributes = {"http.request.method": method, "url.path": scope["path"]}
        if request_id := scope.get("state", {}).get("request_id"):
            attributes["alignloop.request_id"] = request_id
        # Named `{method} {route}` once routed; a path that matches no route leaves `{method}` alone (a name
        # holding a path, ids and all, would make every span name unique).
        with self.tracer.start_as_current_span(method, context=tracing.extract(scope["headers"]),
                                               kind=trace.SpanKind.SERVER, attributes=attributes) as span:
            async def send_traced(message) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        span.set_status(trace.Status(trace.StatusCode.ERROR))
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            finally:
                if (route := scope.get("route")) is not None and hasattr(route, "path"):
                    span.update_name(f"{method} {route.path}")
                    span.set_attribute("http.route", route.path)


def annotate(attributes: Callable[[], dict]) -> None:
    """Adds `attributes()` to the current request's span, if it is traced (only then are they built)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(attributes())


def _with_trace(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    headers = tracing.inject()
    if not headers:
        return details
    return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), *headers.items()))


class _PropagateUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_trace(client_call_details), request)


class _PropagateStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_trace(client_call_details), request)


def propagate_trace() -> list:
    """Client interceptors that put the current trace context in every outgoing call's metadata, for the
    backend's span to join. One per kind of call: a channel files an interceptor under the first kind it is."""
    return [_PropagateUnary(), _PropagateStream()]
