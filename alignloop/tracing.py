"""Distributed tracing: OpenTelemetry spans, joined by W3C trace context, from the gateway to vLLM.

Off unless `ALIGNLOOP_OTLP_TRACES_ENDPOINT` names an OTLP collector (an OpenTelemetry Collector, Jaeger, Tempo,
...). Then one chat request gives one trace:
- the gateway's server span for the HTTP request (continuing the caller's `traceparent`, if it sent one),
- the policy service's span for the Generate call, a child through the call's gRPC metadata,
- vLLM's own `llm_request` span (queue time, time to first token, prefill and decode times), a child through
  the engine's trace headers, exported by vLLM itself (it needs the engine statistics, which are on by default).
Feedback and scoring calls carry the trace context on as well.

The exporter speaks OTLP over gRPC unless `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf`, as vLLM's does,
so one endpoint takes both. Spans leave in batches off the request path (OpenTelemetry's BatchSpanProcessor;
`OTEL_BSP_*` tune it). Each service has its own tracer provider, named by `service.name`; none is installed
globally, so vLLM's, in the policy process, is not overridden.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import os
from collections.abc import Iterable, Mapping

import grpc

# W3C trace context: the headers (and gRPC metadata keys) that carry a trace from one process to the next.
TRACE_HEADERS = ("traceparent", "tracestate")


def tracer(service_name: str, endpoint: str | None):
    """A tracer whose spans go to the OTLP collector at `endpoint` as `service_name`; None when tracing is off."""
    if not endpoint:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter(endpoint)))
    atexit.register(provider.shutdown)  # what is still batched leaves before the process does
    return provider.get_tracer("alignloop")


def span_exporter(endpoint: str):
    """OTLP over gRPC (plain text unless the endpoint says https://), or over HTTP when
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf: the same choice vLLM makes for its own spans."""
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint)
    raise ValueError(f"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL={protocol!r}: alignloop exports 'grpc' or 'http/protobuf'")


@functools.cache
def _propagator():
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def extract(pairs: Iterable[tuple[str, str | bytes]]):
    """The trace context in a request's headers or gRPC metadata (None: start a new trace)."""
    carrier = {}
    for key, value in pairs:
        key = (key.decode("latin-1") if isinstance(key, bytes) else key).lower()
        if key in TRACE_HEADERS:
            carrier[key] = value.decode("latin-1") if isinstance(value, bytes) else value
    return _propagator().extract(carrier) if carrier else None


def inject(span=None) -> dict[str, str]:
    """W3C trace headers for `span` (default: the current span); empty when there is none."""
    from opentelemetry import trace

    context = trace.set_span_in_context(span) if span is not None else None
    carrier: dict[str, str] = {}
    _propagator().inject(carrier, context=context)
    return carrier


@contextlib.contextmanager
def grpc_server_span(tracer_, service: str, method: str, context, attributes: Mapping | None = None):
    """The server span of one gRPC call, a child of the trace in its metadata; None while tracing is off.

    It ends with the call: its status is the call's gRPC status (CANCELLED when the caller went away)."""
    if tracer_ is None:
        yield None
        return
    from opentelemetry.trace import SpanKind, Status, StatusCode

    # Started, not made current: a stream's handler is a generator, and a context set there would leak.
    span = tracer_.start_span(f"{service}/{method}", context=extract(context.invocation_metadata() or ()),
                              kind=SpanKind.SERVER, attributes={"rpc.system": "grpc", "rpc.service": service,
                                                                "rpc.method": method, **(attributes or {})})
    code = grpc.StatusCode.OK
    try:
        yield span
    except (asyncio.CancelledError, GeneratorExit):  # a stream's caller goes away as either
        code = grpc.StatusCode.CANCELLED
        raise
    except BaseException as exc:
        code = context.code() or grpc.StatusCode.UNKNOWN
        if code is grpc.StatusCode.UNKNOWN:
            span.record_exception(exc)
        raise
    finally:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()
