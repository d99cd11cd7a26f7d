"""Gateway logic without the network: a fake policy stub stands in for the gRPC service."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from alignloop.contracts import PARAM_METADATA_KEY
from alignloop.credentials import Credentials, key_hash
from alignloop.v1 import policy_pb2 as pb
from services.gateway import metrics
from services.gateway.app import _validation_error
from services.gateway.auth import KeyRing, Role
from services.gateway.chat import ChatService, to_policy_request
from services.gateway.errors import ApiError, from_rpc_error
from services.gateway.protocol import ChatCompletionRequest, ChunkChoice, DeltaMessage
from services.gateway.routing import PolicyRouter
from services.gateway.streaming import ChunkRenderer
from tests.conftest import wait_for

MODEL = pb.ModelRef(name="alignloop-policy", version="3")


def request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="alignloop-policy", messages=[{"role": "user", "content": "hi"}], **kw)


class FakeLog:
    def __init__(self) -> None:
        self.records = []

    def submit(self, record) -> None:
        self.records.append(record)


class FakeStreamCall:
    def __init__(self, messages) -> None:
        self.messages = list(messages)
        self.cancelled = False

    async def read(self):
        return self.messages.pop(0) if self.messages else grpc.aio.EOF

    def cancel(self) -> None:
        self.cancelled = True


class FakeStub:
    def __init__(self, unary=None, stream=None) -> None:
        self.unary, self.stream, self.sent = unary, stream, []

    async def Generate(self, req, timeout=None, metadata=None):
        self.sent.append(req)
        if isinstance(self.unary, Exception):
            raise self.unary
        return self.unary

    def GenerateStream(self, req, timeout=None, metadata=None):
        self.sent.append(req)
        return self.stream


def rpc_error(code, details, param=None) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata((PARAM_METADATA_KEY, param)) if param else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


# ---- protocol -------------------------------------------------------------------------------------------


def test_stop_accepts_a_string_or_a_list_and_defaults_to_empty():
    assert request().stop == []
    assert request(stop="###").stop == ["###"]
    assert request(stop=["a", "b"]).stop == ["a", "b"]
    with pytest.raises(ValidationError):
        request(stop=["a"] * 5)


def test_content_parts_and_developer_role():
    req = ChatCompletionRequest(model="m", messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
    ])
    msg = to_policy_request(req, "r1").chat.messages[0]
    assert (msg.role, msg.content) == ("system", "Be brief.")


def bad_request(body: dict) -> ApiError:
    """What the gateway answers to `body` (a chat request's fields besides the model), as its handler of
    FastAPI's validation errors builds it."""
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest(model="alignloop-policy", **body)
    errors = [{**x, "loc": ("body", *x["loc"])} for x in e.value.errors()]  # as FastAPI reports a body's
    return _validation_error(RequestValidationError(errors))


@pytest.mark.parametrize(("content", "param", "says"), [
    ([{"type": "image_url", "image_url": {"url": "https://x/y.png"}}], "messages.0.content",
     "part 0 is not a text part (type 'image_url')"),
    ([{"type": "text", "text": "a"}, "b"], "messages.0.content", "part 1 is not a text part (no type)"),
    (None, "messages.0.content", "must be a string or a list of text parts"),
    (7, "messages.0.content", "must be a string or a list of text parts"),
    # Past the type check, the union's list branch has the error that says what is wrong.
    ([{"type": "text"}], "messages.0.content.0.text", "Field required"),
])
def test_content_that_is_not_text_is_refused_naming_the_field(content, param, says):
    err = bad_request({"messages": [{"role": "user", "content": content}]})
    assert (err.status_code, err.param) == (400, param)
    assert says in err.message and "valid string" not in err.message


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"stop": 5}, "stop", "must be a string or a list of strings"),
    ({"stop": ["a", 1]}, "stop.1", "valid string"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "'assistant'"),
    # Two fields wrong: the first is named, however deep the second's error.
    ({"messages": "hi", "stop": ["a", 1]}, "messages", "valid list"),
])
def test_validation_errors_name_the_field_without_union_branches(body, param, says):
    err = bad_request({"messages": [{"role": "user", "content": "hi"}], **body})
    assert (err.status_code, err.param) == (400, param) and says in err.message


def test_policy_request_carries_sampling_only_when_given():
    sent = to_policy_request(request(), "r1")
    assert not sent.sampling.HasField("temperature") and not sent.sampling.HasField("max_tokens")
    sent = to_policy_request(request(temperature=0, max_completion_tokens=9, max_tokens=3, seed=5, n=2), "r2")
    assert sent.sampling.temperature == 0 and sent.sampling.HasField("temperature")
    assert sent.sampling.max_tokens == 9  # the newer name wins
    assert sent.sampling.seed == 5 and sent.sampling.n == 2 and sent.request_id == "r2"
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "min_p"):
        assert not sent.sampling.HasField(name)
    assert not sent.sampling.logit_bias


def test_penalties_top_k_min_p_and_logit_bias_reach_the_policy_and_the_record():
    req = ChatCompletionRequest.model_validate({
        "model": "alignloop-policy", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5,
        "frequency_penalty": -1, "repetition_penalty": 1.1, "top_k": 0, "min_p": 0.05,
        "logit_bias": {"42": -100, "7": 2.5}})
    s = to_policy_request(req, "r").sampling
    assert (s.presence_penalty, s.frequency_penalty, s.top_k) == (0.5, -1.0, 0)
    assert s.HasField("top_k")  # 0 was said, and is sent
    assert abs(s.repetition_penalty - 1.1) < 1e-6 and abs(s.min_p - 0.05) < 1e-6  # float32 on the wire
    assert dict(s.logit_bias) == {42: -100.0, 7: 2.5}

    resp = pb.GenerateResponse(completions=[pb.Completion(index=0, text="Hi", token_ids=[5], finish_reason="stop")],
                               prompt_tokens=2, model=MODEL)
    log = FakeLog()
    asyncio.run(ChatService(PolicyRouter(FakeStub(unary=resp)), log, 10).complete(req, "h"))
    sampling = log.records[0].sampling
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.repetition_penalty) == (0.5, -1, 1.1)
    assert (sampling.top_k, sampling.min_p, sampling.logit_bias) == (0, 0.05, {42: -100.0, 7: 2.5})
    # The record round-trips through its JSON (Kafka), token ids and all.
    again = type(log.records[0]).model_validate_json(log.records[0].model_dump_json())
    assert again.sampling == sampling


@pytest.mark.parametrize(("body", "sent", "recorded"), [
    ({"response_format": {"type": "text"}}, None, None),
    ({"response_format": {"type": "json_object"}}, {"json_object": True}, {"json_object": True}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "verdict", "schema": {"enum": ["a"]}}}},
     {"json_schema": '{"enum": ["a"]}'}, {"json_schema": {"enum": ["a"]}}),
    ({"structured_outputs": {"json": {"type": "boolean"}}}, {"json_schema": '{"type": "boolean"}'},
     {"json_schema": {"type": "boolean"}}),
    ({"structured_outputs": {"regex": "[0-9]+"}}, {"regex": "[0-9]+"}, {"regex": "[0-9]+"}),
    ({"structured_outputs": {"choice": ["x", "y"]}}, {"choice": {"values": ["x", "y"]}}, {"choice": ["x", "y"]}),
])
def test_constraints_reach_the_policy_and_the_record(body, sent, recorded):
    from google.protobuf.json_format import MessageToDict

    req = ChatCompletionRequest.model_validate({"model": "alignloop-policy", "messages": [{"role": "user",
                                                                                          "content": "hi"}], **body})
    sampling = to_policy_request(req, "r").sampling
    assert (MessageToDict(sampling.structured_output, preserving_proto_field_name=True)
            if sampling.HasField("structured_output") else None) == sent
    resp = pb.GenerateResponse(completions=[pb.Completion(index=0, text="x", token_ids=[5], finish_reason="stop")],
                               prompt_tokens=2, model=MODEL)
    log = FakeLog()
    asyncio.run(ChatService(PolicyRouter(FakeStub(unary=resp)), log, 10).complete(req, "h"))
    assert log.records[0].sampling.structured_output == recorded


@pytest.mark.parametrize(("body", "field"), [
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "a", "schema": {}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "no spaces", "schema": {}}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
])
def test_malformed_constraints_are_refused_by_the_protocol(body, field):
    with pytest.raises(ValidationError) as e:
        request(**body)
    assert e.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize(("body", "param"), [({"structured_outputs": {"regex": "("}}, "structured_outputs"),
                                             ({"response_format": {"type": "json_object"}}, "response_format"),
                                             ({}, "structured_output")])
def test_the_policys_refusal_of_a_constraint_names_the_field_the_request_used(body, param):
    stub = FakeStub(unary=rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "bad constraint", "structured_output"))
    with pytest.raises(ApiError) as e:
        asyncio.run(ChatService(PolicyRouter(stub), FakeLog(), 10).complete(request(**body), "h"))
    assert (e.value.status_code, e.value.param) == (400, param)


def test_what_the_server_cannot_do_is_named_not_ignored():
    tool = [{"type": "function", "function": {"name": "lookup"}}]
    assert request(tools=tool).unsupported()[0] == "tools"
    assert request(tools=tool, tool_choice="none").unsupported() is None  # no call may be made: plain text
    assert request(tools=[]).unsupported() is None
    assert request(functions=[{"name": "lookup"}]).unsupported()[0] == "functions"
    assert request(modalities=["text", "audio"]).unsupported()[0] == "modalities"
    assert request(audio={"voice": "alloy", "format": "wav"}).unsupported()[0] == "audio"
    assert request(modalities=["text"]).unsupported() is None


@pytest.mark.parametrize(("field", "value"), [
    ("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("repetition_penalty", 0), ("top_k", -2),
    ("min_p", 1.5), ("logit_bias", {"x": 1}), ("logit_bias", {"-1": 1}), ("logit_bias", {"3": 101}),
    ("logit_bias", {str(i): 1 for i in range(301)}),
])
def test_bad_sampling_knobs_are_refused_by_the_protocol(field, value):
    with pytest.raises(ValidationError) as e:
        request(**{field: value})
    assert e.value.errors()[0]["loc"][0] == field


# ---- errors and auth ------------------------------------------------------------------------------------


def test_rpc_errors_map_to_http_with_the_param():
    err = from_rpc_error(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "too long", "messages"))
    assert (err.status_code, err.param, err.type) == (400, "messages", "invalid_request_error")
    assert from_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, "down")).status_code == 503
    assert from_rpc_error(rpc_error(grpc.StatusCode.INTERNAL, "boom")).status_code == 502


def test_keyring_roles():
    ring = KeyRing(Credentials(app_key="a-key", operator_key="o-key"))
    assert ring.authenticate("Bearer a-key").role is Role.APP
    op = ring.authenticate("bearer o-key")
    assert op.role is Role.OPERATOR and op.key_hash == key_hash("o-key")
    assert ring.require_operator(op) is op
    with pytest.raises(ApiError) as e:
        ring.require_operator(ring.authenticate("Bearer a-key"))
    assert e.value.status_code == 403
    for bad in (None, "", "Bearer", "Bearer wrong", "Basic a-key", "a-key"):
        with pytest.raises(ApiError) as e:
            ring.authenticate(bad)
        assert e.value.status_code == 401


# ---- serving --------------------------------------------------------------------------------------------


def token_counters() -> tuple[float, float, float]:
    """The gateway's prompt, cached prompt and generated token counters."""
    return (metrics.PROMPT_TOKENS._value.get(), metrics.CACHED_PROMPT_TOKENS._value.get(),
            metrics.GENERATED_TOKENS._value.get())


def test_complete_builds_choices_usage_and_one_record_per_choice():
    resp = pb.GenerateResponse(
        completions=[pb.Completion(index=0, text="Hi!", token_ids=[5, 6], finish_reason="stop"),
                     pb.Completion(index=1, text="Yo", token_ids=[7], finish_reason="length")],
        prompt_tokens=4, model=MODEL, cached_tokens=2,
    )
    log = FakeLog()
    before = token_counters()
    out = asyncio.run(ChatService(PolicyRouter(FakeStub(unary=resp)), log, 10).complete(request(n=2), "h"))
    assert [c.message.content for c in out.choices] == ["Hi!", "Yo"]
    assert out.usage.model_dump() == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7,
                                      "prompt_tokens_details": {"cached_tokens": 2}}
    assert out.system_fingerprint == "alignloop-policy/v3"
    assert [r.completion_id for r in log.records] == [c.completion_id for c in out.choices]
    assert [r.completion_tokens for r in log.records] == [2, 1]
    assert [(r.prompt_tokens, r.cached_tokens) for r in log.records] == [(4, 2), (4, 2)]
    assert [a - b for a, b in zip(token_counters(), before)] == [4, 2, 3]  # the prompt counted once
    assert all(r.model_version == "3" and r.api_key_hash == "h" for r in log.records)


def test_complete_turns_invalid_argument_into_a_400():
    stub = FakeStub(unary=rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens too big", "max_tokens"))
    with pytest.raises(ApiError) as e:
        asyncio.run(ChatService(PolicyRouter(stub), FakeLog(), 10).complete(request(), "h"))
    assert (e.value.status_code, e.value.param) == (400, "max_tokens")


async def _collect(service, req):
    """The data of each server-sent event of the stream."""
    events = await service.stream(req, "h")
    data = []
    async for event in events:
        text = event.decode()
        assert text.startswith("data: ") and text.endswith("\n\n") and "\n" not in text[:-2], text
        data.append(text.removeprefix("data: ").removesuffix("\n\n"))
    return data


def test_stream_emits_role_chunks_deltas_finish_usage_and_done():
    call = FakeStreamCall([
        pb.GenerateStreamResponse(prompt_tokens=3, model=MODEL),  # the policy's "accepted" message
        # The engine's cache hits come with its first output, and only there.
        pb.GenerateStreamResponse(deltas=[pb.Completion(index=0, text="He", token_ids=[1])], cached_tokens=2),
        pb.GenerateStreamResponse(deltas=[pb.Completion(index=1, text="Yo", token_ids=[2])]),
        pb.GenerateStreamResponse(deltas=[pb.Completion(index=0, text="llo", token_ids=[3], finish_reason="stop"),
                                          pb.Completion(index=1, text="", token_ids=[4], finish_reason="length")]),
    ])
    log = FakeLog()
    req = request(n=2, stream=True, stream_options={"include_usage": True})
    before = token_counters()
    events = asyncio.run(_collect(ChatService(PolicyRouter(FakeStub(stream=call)), log, 10), req))

    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    body = chunks[2:-1]
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"].get("content"),
             c["choices"][0].get("finish_reason")) for c in body] == [
        (0, "He", None), (1, "Yo", None), (0, "llo", "stop"), (1, "", "length")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 2}}
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert [(r.choice_index, r.response_text, r.finish_reason, r.cached_tokens) for r in log.records] == [
        (0, "Hello", "stop", 2), (1, "Yo", "length", 2)]
    assert [a - b for a, b in zip(token_counters(), before)] == [3, 2, 4]
    assert call.cancelled  # the call is always released


def test_stream_error_before_first_message_is_an_http_error():
    class Failing(FakeStreamCall):
        async def read(self):
            raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "prompt too long", "messages")

    with pytest.raises(ApiError) as e:
        asyncio.run(_collect(ChatService(PolicyRouter(FakeStub(stream=Failing([]))), FakeLog(), 10), request(stream=True)))
    assert (e.value.status_code, e.value.param) == (400, "messages")


def test_stream_error_midway_is_reported_in_band_then_done():
    class Breaks(FakeStreamCall):
        async def read(self):
            if self.messages:
                return self.messages.pop(0)
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "engine died")

    call = Breaks([pb.GenerateStreamResponse(deltas=[pb.Completion(index=0, text="a", token_ids=[1])],
                                             prompt_tokens=1, model=MODEL)])
    log = FakeLog()
    events = asyncio.run(_collect(ChatService(PolicyRouter(FakeStub(stream=call)), log, 10), request(stream=True)))
    assert json.loads(events[-2])["error"]["message"].startswith("policy service: engine died")
    assert events[-1] == "[DONE]"
    assert log.records == []  # an unfinished choice is not recorded as served


def test_stream_keeps_logprobs_of_tokens_that_complete_no_character_yet():
    # vLLM holds back the text of a partial multi-byte character; its token still has a logprob.
    lp = pb.TokenLogprob(token_id=9, token="\ufffd", logprob=-0.5)
    call = FakeStreamCall([
        pb.GenerateStreamResponse(prompt_tokens=2, model=MODEL),  # the policy's "accepted" message
        pb.GenerateStreamResponse(deltas=[pb.Completion(index=0, text="", token_ids=[9], logprobs=[lp])]),
        pb.GenerateStreamResponse(deltas=[pb.Completion(index=0, text="é", token_ids=[10], finish_reason="stop",
                                                        logprobs=[pb.TokenLogprob(token_id=10, token="é")])]),
    ])
    events = asyncio.run(_collect(ChatService(PolicyRouter(FakeStub(stream=call)), FakeLog(), 10),
                                  request(stream=True, logprobs=True)))
    chunks = [json.loads(e) for e in events[:-1]]
    streamed = [entry for c in chunks for entry in (c["choices"][0].get("logprobs") or {}).get("content", [])]
    assert [e["logprob"] for e in streamed] == [-0.5, 0.0]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "é"


# ---- the completion log never makes a request wait --------------------------------------------------------


class FakeProducer:
    """Stands in for kafka-python's producer. With `stuck`, send() blocks until `release` is set (a broker that
    does not answer); while `down`, sends fail, as after the delivery timeout. Its futures are already done and
    call a callback added late at once, with the arguments kafka-python gives (the exception last)."""

    def __init__(self, stuck: bool = False) -> None:
        import threading

        self.release = threading.Event()
        if not stuck:
            self.release.set()
        self.stuck = threading.Event()
        self.down = False
        self.attempts: list[str] = []
        self.sent: list[str] = []  # acknowledged

    def send(self, topic, key, value):
        self.stuck.set()
        self.release.wait()
        self.attempts.append(key.decode())
        failed = self.down
        if not failed:
            self.sent.append(key.decode())

        class Future:
            def add_callback(self, fn, *a):
                if not failed:
                    fn(*a, None)
                return self

            def add_errback(self, fn, *a):
                if failed:
                    fn(*a, ConnectionError("broker down"))
                return self

        return Future()

    def flush(self, timeout=None):
        pass

    def close(self, timeout=None):
        pass


def _record(i: int):
    from alignloop.topics import CompletionRecordV1, SamplingV1

    return CompletionRecordV1(
        completion_id=f"cmpl-{i}", response_id="r", choice_index=0, messages=[], response_text="", finish_reason="stop",
        prompt_tokens=1, completion_tokens=1, model_name="m", model_version="1", sampling=SamplingV1(),
        api_key_hash="h", stream=False, created_at=0.0, finished_at=0.0,
    )


def test_completion_log_submit_never_blocks_and_counts_what_it_drops():
    from services.gateway.completion_log import RECORDS, CompletionLog

    dropped_before = RECORDS.labels("dropped")._value.get()
    producer = FakeProducer(stuck=True)
    log = CompletionLog(producer, max_queue=2)
    log.submit(_record(0))
    assert producer.stuck.wait(10), "the sender thread never called send()"
    # The sender is stuck on record 0: records 1 and 2 fill the queue, 3 to 5 are dropped, and no call blocks.
    for i in range(1, 6):
        log.submit(_record(i))
    assert producer.sent == []
    assert RECORDS.labels("dropped")._value.get() - dropped_before == 3
    producer.release.set()
    log.close()
    assert producer.sent == ["cmpl-0", "cmpl-1", "cmpl-2"]


def test_completion_log_keeps_what_kafka_refused_and_sends_it_when_kafka_is_back(monkeypatch):
    from services.gateway import completion_log
    from services.gateway.completion_log import BACKLOG, CompletionLog

    monkeypatch.setattr(completion_log, "RESEND_CHUNK", 2)  # the 5 kept records go back in three passes

    producer = FakeProducer()
    log = CompletionLog(producer, first_backoff_s=0.05, max_backoff_s=0.2)
    log.submit(_record(0))
    wait_for(lambda: producer.sent == ["cmpl-0"])
    producer.down = True
    for i in range(1, 6):
        log.submit(_record(i))
    wait_for(lambda: log.backlog() == 5)
    assert not log.healthy() and BACKLOG._value.get() == 5
    # While Kafka is down one kept record at a time goes out as a probe, with growing pauses.
    time.sleep(0.6)
    probes = len(producer.attempts) - 1
    assert 2 <= probes <= 6 + 5, producer.attempts  # the first failure of each record, then backoffs
    producer.down = False
    wait_for(lambda: log.backlog() == 0)
    assert log.healthy() and BACKLOG._value.get() == 0
    assert sorted(producer.sent) == [f"cmpl-{i}" for i in range(6)]  # nothing lost, each acked once
    log.close()


def test_completion_log_backlog_is_bounded_and_what_is_left_at_shutdown_is_counted():
    from services.gateway.completion_log import RECORDS, CompletionLog

    dropped_before = RECORDS.labels("dropped")._value.get()
    producer = FakeProducer()
    producer.down = True
    log = CompletionLog(producer, max_queue=3, first_backoff_s=60)
    for i in range(5):
        log.submit(_record(i))
        # Full at 3: each newer record makes room by dropping the oldest.
        wait_for(lambda: (log.backlog(), RECORDS.labels("dropped")._value.get() - dropped_before)
                   == (min(i + 1, 3), max(0, i - 2)))
    assert producer.attempts == ["cmpl-0"]  # the others were held back, not sent into a broker that is down
    assert [r.completion_id for r in log._backlog] == ["cmpl-2", "cmpl-3", "cmpl-4"]
    log.close()
    assert RECORDS.labels("dropped")._value.get() - dropped_before == 5
    assert producer.sent == []


@pytest.mark.parametrize("text", [" hello", "", "é✓ 漢字", "line\nbreak\t\"quoted\" \\ \x01\x1f", "\u2028 /</script>"])
def test_content_chunks_from_the_template_equal_the_protocol_models(text):
    render = ChunkRenderer("chatcmpl-1", 1700000000, "alignloop-policy", "alignloop-policy/v3", ["cmpl-a", "cmpl-b"])
    for index, completion_id in enumerate(["cmpl-a", "cmpl-b"]):
        by_models = render.chunk([ChunkChoice(index=index, delta=DeltaMessage(content=text), completion_id=completion_id)])
        assert render.content(index, text) == by_models
        assert json.loads(by_models.decode().removeprefix("data: "))["choices"][0]["delta"]["content"] == text


@pytest.mark.parametrize(("kafka", "feedback", "policy", "status"), [
    (True, True, True, 200),
    (False, False, True, 200),  # shared backends failing do not take the gateway (and chat) out of service
    (True, True, False, 503),
])
def test_readiness_needs_the_policy_and_reports_the_rest(kafka, feedback, policy, status):
    import httpx

    from alignloop.config import Settings
    from alignloop.v1 import feedback_pb2
    from services.gateway.app import create_app

    class Backends:
        def healthy(self):
            return kafka

        async def Health(self, req, timeout=None):
            return feedback_pb2.HealthResponse(ready=feedback)

        async def GetInfo(self, req, timeout=None):
            return pb.GetInfoResponse(ready=policy)

    app = create_app(Settings(_env_file=None))
    app.state.completion_log = app.state.feedback_stub = app.state.policy = Backends()

    async def probe():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            return await client.get("/readyz")

    r = asyncio.run(probe())
    assert r.status_code == status
    assert r.json() == {"ready": policy, "checks": {"kafka": kafka, "feedback": feedback, "policy": policy}}
