"""alignloop/tracing.py without a collector: reading and writing W3C trace context, and the exporter choice."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from alignloop import tracing

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("pairs", [
    [(b"host", b"x"), (b"traceparent", TRACEPARENT.encode())],  # ASGI headers
    [("TraceParent", TRACEPARENT)],  # gRPC metadata, any case
], ids=["asgi", "grpc"])
def test_extract_reads_the_callers_trace(pairs) -> None:
    context = trace.get_current_span(tracing.extract(pairs)).get_span_context()
    assert (f"{context.trace_id:032x}", f"{context.span_id:016x}") == (TRACEPARENT[3:35], TRACEPARENT[36:52])


def test_no_trace_context_starts_a_new_trace() -> None:
    assert tracing.extract([(b"host", b"x")]) is None
    assert tracing.inject() == {}  # no current span: nothing to send


def test_inject_writes_the_spans_context() -> None:
    span = TracerProvider().get_tracer("t").start_span("s")
    headers = tracing.inject(span)
    context = span.get_span_context()
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert int(flags, 16) & 1  # sampled


def test_tracing_is_off_without_an_endpoint() -> None:
    assert tracing.tracer("alignloop-gateway", None) is None


def test_an_unknown_protocol_is_named(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "carrier-pigeon")
    with pytest.raises(ValueError, match="carrier-pigeon"):
        tracing.span_exporter("127.0.0.1:4317")
