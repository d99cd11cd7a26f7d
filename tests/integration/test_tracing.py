"""Distributed tracing on a real stack (alignloop/tracing.py): a chat request's spans, from the gateway, the
policy service and vLLM's engine, reach an OTLP collector as one trace, each the child of the one before, and
the caller's own `traceparent` is continued."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.conftest import Stack, free_port, start_stack

pytestmark = pytest.mark.integration


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it is sent, with its service's name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans: list[tuple[str, object]] = []

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope_spans in resource_spans.scope_spans:
                    self.spans += [(service, span) for span in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def in_trace(self, trace_id: bytes) -> list[tuple[str, object]]:
        with self._lock:
            return [(service, span) for service, span in self.spans if span.trace_id == trace_id]

    def wait_for(self, trace_id: bytes, names: set[str], timeout: float = 60) -> dict[str, tuple[str, object]]:
        """The trace's spans by name, once it holds every one of `names`."""
        deadline = time.monotonic() + timeout
        while True:
            found = {span.name: (service, span) for service, span in self.in_trace(trace_id)}
            if names <= set(found):
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"trace {trace_id.hex()} has {sorted(found)}, not all of {sorted(names)}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, str]]:
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    endpoint = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(endpoint)
    server.start()
    yield servicer, endpoint
    server.stop(None)


@pytest.fixture(scope="module")
def traced_stack(collector, tmp_path_factory) -> Iterator[Stack]:
    _, endpoint = collector
    stack = start_stack(tmp_path_factory.mktemp("traced"), ALIGNLOOP_OTLP_TRACES_ENDPOINT=endpoint,
                        OTEL_BSP_SCHEDULE_DELAY="100")  # spans leave every 0.1 s, not every 5 s
    yield stack
    stack.stop()


def attributes(span) -> dict:
    out = {}
    for a in span.attributes:
        value = a.value
        kind = value.WhichOneof("value")
        out[a.key] = ([v.string_value for v in value.array_value.values] if kind == "array_value"
                      else getattr(value, kind))
    return out


def chat(stack: Stack, headers: dict[str, str], stream: bool, content: str = "hello") -> httpx.Response:
    body = {"model": "alignloop-policy", "messages": [{"role": "user", "content": content}], "max_tokens": 5,
            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    r = httpx.post(f"{stack.gateway}/v1/chat/completions", json=body, timeout=120,
                   headers={"Authorization": f"Bearer {stack.credentials['app_key']}", **headers})
    assert r.status_code == 200, r.text
    return r


GATEWAY_SPAN = "POST /v1/chat/completions"


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_chat_request_is_one_trace_through_gateway_policy_and_engine(collector, traced_stack, stream):
    spans, _ = collector
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e47%02x" % stream, "00f067aa0ba902b7"
    # Asked once before, untraced, so that the engine's prefix cache holds a block of it (128 tokens on CPU).
    question = f"{uuid.uuid4().hex} " + " ".join(f"Rule {i}: be brief." for i in range(14))
    chat(traced_stack, {}, stream, question)
    r = chat(traced_stack, {"traceparent": f"00-{trace_id}-{caller_span}-01", "X-Request-Id": f"traced-{stream}"},
             stream, question)
    usage = (r.json() if not stream else json.loads(r.text.split("data: ")[-2]))["usage"]
    method = "GenerateStream" if stream else "Generate"
    found = spans.wait_for(bytes.fromhex(trace_id), {GATEWAY_SPAN, f"alignloop.v1.PolicyService/{method}",
                                                      "llm_request"})
    (gw_service, gateway) = found[GATEWAY_SPAN]
    (policy_service, policy) = found[f"alignloop.v1.PolicyService/{method}"]
    (_, engine) = found["llm_request"]

    # The caller's trace continues: gateway <- caller, policy <- gateway, vLLM's engine <- policy.
    assert gateway.parent_span_id == bytes.fromhex(caller_span)
    assert policy.parent_span_id == gateway.span_id
    assert engine.parent_span_id == policy.span_id
    assert (gw_service, policy_service) == ("alignloop-gateway", "alignloop-policy")

    gw = attributes(gateway)
    assert gw["http.response.status_code"] == 200 and gw["http.route"] == "/v1/chat/completions"
    assert gw["alignloop.request_id"] == f"traced-{stream}" == r.headers["x-request-id"]
    assert gw["gen_ai.usage.output_tokens"] >= 1 and gw["alignloop.model.version"] == "1"
    assert gw["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert 0 < gw["gen_ai.usage.cache_read.input_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert attributes(policy)["rpc.grpc.status_code"] == 0
    assert attributes(engine)["gen_ai.usage.completion_tokens"] == gw["gen_ai.usage.output_tokens"]
    # A stream's span lasts until its last event is sent, after the engine finished.
    assert gateway.end_time_unix_nano >= policy.end_time_unix_nano


def test_a_request_without_a_traceparent_starts_a_trace(collector, traced_stack):
    spans, _ = collector
    rid = "untraced-caller"
    chat(traced_stack, {"X-Request-Id": rid}, stream=False)
    deadline = time.monotonic() + 60
    while True:
        roots = [span for _, span in spans.spans if span.name == GATEWAY_SPAN
                 and attributes(span).get("alignloop.request_id") == rid]
        if roots or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    [root] = roots
    assert root.parent_span_id == b""
    # The supervisor polled /readyz while the stack came up: probes make no spans.
    assert not [span.name for _, span in spans.spans if "readyz" in span.name]
    names = {span.name for _, span in spans.wait_for(root.trace_id, {"alignloop.v1.PolicyService/Generate"}).values()}
    assert "alignloop.v1.PolicyService/Generate" in names


def test_a_refused_request_is_traced_with_its_status(collector, traced_stack):
    spans, _ = collector
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4736"
    r = httpx.post(f"{traced_stack.gateway}/v1/chat/completions",
                   json={"model": "alignloop-policy", "messages": [{"role": "user", "content": "x" * 5000}]},
                   headers={"Authorization": f"Bearer {traced_stack.credentials['app_key']}",
                            "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}, timeout=60)
    assert r.status_code == 400
    found = spans.wait_for(bytes.fromhex(trace_id), {GATEWAY_SPAN, "alignloop.v1.PolicyService/Generate"})
    assert attributes(found[GATEWAY_SPAN][1])["http.response.status_code"] == 400
    policy = attributes(found["alignloop.v1.PolicyService/Generate"][1])
    assert policy["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_feedback_and_scoring_calls_join_the_callers_trace(collector, traced_stack):
    """The collector's and the reward service's spans are children of the gateway's."""
    spans, _ = collector
    headers = {"Authorization": f"Bearer {traced_stack.credentials['app_key']}"}
    best_of_trace, feedback_trace = "6bf92f3577b34da6a3ce929d0e0e4736", "7bf92f3577b34da6a3ce929d0e0e4736"
    r = httpx.post(f"{traced_stack.gateway}/v1/chat/completions", timeout=120,
                   headers={**headers, "traceparent": f"00-{best_of_trace}-00f067aa0ba902b7-01"},
                   json={"model": "alignloop-policy", "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 5, "min_tokens": 3, "temperature": 1.0, "best_of": 2})
    assert r.status_code == 200, r.text
    completion_id = r.json()["choices"][0]["completion_id"]
    r = httpx.post(f"{traced_stack.gateway}/v1/feedback", timeout=60,
                   headers={**headers, "traceparent": f"00-{feedback_trace}-00f067aa0ba902b7-01"},
                   json={"kind": "thumbs", "completion_id": completion_id, "value": "up"})
    assert r.status_code == 200, r.text

    scored = spans.wait_for(bytes.fromhex(best_of_trace), {GATEWAY_SPAN, "alignloop.v1.RewardService/Score"})
    service, score = scored["alignloop.v1.RewardService/Score"]
    assert service == "alignloop-reward" and score.parent_span_id == scored[GATEWAY_SPAN][1].span_id
    assert 1 <= attributes(score)["alignloop.items"] <= 2  # an answer that decodes to nothing is not scored

    submitted = spans.wait_for(bytes.fromhex(feedback_trace), {"POST /v1/feedback",
                                                                "alignloop.v1.FeedbackService/Submit"})
    service, submit = submitted["alignloop.v1.FeedbackService/Submit"]
    assert service == "alignloop-feedback" and submit.parent_span_id == submitted["POST /v1/feedback"][1].span_id
    assert attributes(submit)["rpc.grpc.status_code"] == 0
