"""The chat path end to end: official openai SDK -> gateway -> gRPC -> vLLM, and the records on Kafka."""

from __future__ import annotations

import json
import re
import time
import uuid

import grpc
import httpx
import openai
import pytest
from kafka import KafkaConsumer, TopicPartition

from alignloop import credentials
from alignloop.credentials import key_hash
from alignloop.topics import COMPLETIONS_V1, CompletionRecordV1
from alignloop.v1 import policy_pb2 as pb
from alignloop.v1 import policy_pb2_grpc as pb_grpc
from tests.conftest import TEST_MAX_MODEL_LEN, TEST_MAX_N, wait_for, wait_until_taken

pytestmark = pytest.mark.integration

MODEL = "alignloop-policy"
HELLO = [{"role": "user", "content": "Say hello."}]


def read_records(bootstrap: str, wanted: set[str], timeout: float = 30.0) -> dict[str, CompletionRecordV1]:
    """Reads the completions topic from the beginning until every wanted completion id has a record."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=1000)
    partitions = [TopicPartition(COMPLETIONS_V1, p) for p in consumer.partitions_for_topic(COMPLETIONS_V1)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    found: dict[str, list[CompletionRecordV1]] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not wanted <= found.keys():
            for message in consumer:
                record = CompletionRecordV1.model_validate_json(message.value)
                assert message.key.decode() == record.completion_id
                found.setdefault(record.completion_id, []).append(record)
    finally:
        consumer.close()
    for cid in wanted & found.keys():
        assert len(found[cid]) == 1, f"{cid} was recorded {len(found[cid])} times"
    return {cid: found[cid][0] for cid in wanted if cid in found}


def test_non_streaming_chat(openai_client, stack):
    resp = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    assert resp.object == "chat.completion"
    assert resp.model == MODEL
    assert resp.system_fingerprint == f"{MODEL}/v1"
    [choice] = resp.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert choice.completion_id.startswith("cmpl-")
    assert 0 < resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

    # Greedy decoding is deterministic: the same request gives the same answer.
    again = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == choice.message.content
    assert again.choices[0].completion_id != choice.completion_id


def test_stop_sequence_ends_the_answer_before_it(openai_client):
    # Seeded sampling is repeatable and, unlike greedy decoding of the random tiny model, gives varied text.
    kw = dict(model=MODEL, messages=HELLO, max_tokens=24, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    full = openai_client.chat.completions.create(**kw).choices[0].message.content
    # A stop string taken from inside the answer: the same request must now end just before it.
    cut = next(i for i in range(len(full) // 2, len(full) - 1) if full[i:i + 2].strip())
    stop = full[cut:cut + 2]
    stopped = openai_client.chat.completions.create(**kw, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == full[:full.index(stop)]


def test_seed_makes_sampling_repeatable(openai_client):
    kw = dict(model=MODEL, messages=HELLO, max_tokens=8, temperature=1.0, n=2, extra_body={"ignore_eos": True})
    a = [c.message.content for c in openai_client.chat.completions.create(**kw, seed=123).choices]
    b = [c.message.content for c in openai_client.chat.completions.create(**kw, seed=123).choices]
    c = [c.message.content for c in openai_client.chat.completions.create(**kw, seed=124).choices]
    assert a == b
    assert a != c


def test_n_choices_each_with_its_own_id_and_record(openai_client, stack):
    resp = openai_client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=6, n=2, temperature=1.0, seed=7
    )
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp._request_id.startswith("req_")  # the gateway's own, since the client sent none
    ids = {c.completion_id for c in resp.choices}
    assert len(ids) == 2

    records = read_records(stack.kafka, ids)
    assert records.keys() == ids
    for choice in resp.choices:
        rec = records[choice.completion_id]
        assert rec.response_id == resp.id and rec.request_id == resp._request_id
        assert rec.choice_index == choice.index
        assert rec.response_text == choice.message.content
        assert rec.messages[0].content == "Say hello." and rec.messages[0].role == "user"
        assert rec.model_name == MODEL and rec.model_version == "1"
        assert rec.sampling.n == 2 and rec.sampling.seed == 7 and rec.sampling.max_tokens == 6
        assert rec.api_key_hash == key_hash(stack.credentials["app_key"])
        assert rec.stream is False
        assert rec.created_at <= rec.finished_at


def test_streaming_chat_matches_the_openai_chunk_format(openai_client, stack):
    stream = openai_client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[-1].choices[0].finish_reason == "length"
    completion_id = chunks[0].choices[0].completion_id
    assert all(c.choices[0].completion_id == completion_id for c in content_chunks)
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    # The usage chunk comes last and has no choices.
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10

    # Same greedy request, not streamed: the same text.
    whole = openai_client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert whole.choices[0].message.content == text

    rec = read_records(stack.kafka, {completion_id})[completion_id]
    assert rec.stream is True and rec.response_text == text and rec.completion_tokens == 10


def test_prompt_tokens_the_prefix_cache_held_are_reported_recorded_and_billed(stack):
    # A tenant of its own, so that the usage report's figures are this test's alone.
    name = f"cache-{uuid.uuid4().hex[:8]}"
    key = credentials.add_app(stack.home / "credentials.json", name)
    wait_until_taken(key, stack.gateway)
    client = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=key, max_retries=0)
    # A system prompt that no earlier request began with (its first words are new), long enough to fill a KV
    # block (vLLM's CPU blocks hold 128 tokens, its CUDA ones 16) and short enough for the tests' context.
    system = {"role": "system", "content": f"{uuid.uuid4().hex} " + " ".join(f"Rule {i}: be brief." for i in range(14))}
    asked = [system, {"role": "user", "content": "Say hello."}]

    first = client.chat.completions.create(model=MODEL, messages=asked, max_tokens=4, temperature=0)
    assert TEST_MAX_MODEL_LEN // 2 < first.usage.prompt_tokens < TEST_MAX_MODEL_LEN - 4
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # The same prompt again: all of it but the part of a block the engine must compute anew is cached.
    again = client.chat.completions.create(model=MODEL, messages=asked, max_tokens=4, temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert again.usage.prompt_tokens // 2 <= cached < again.usage.prompt_tokens
    # Another question under the same system prompt, streamed: the system prompt's blocks are shared.
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[system, {"role": "user", "content": "Say goodbye."}], max_tokens=4, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    streamed = chunks[-1].usage.prompt_tokens_details.cached_tokens
    assert 0 < streamed <= cached

    ids = {first.choices[0].completion_id: 0, again.choices[0].completion_id: cached,
           chunks[0].choices[0].completion_id: streamed}
    records = read_records(stack.kafka, set(ids))
    assert {cid: rec.cached_tokens for cid, rec in records.items()} == ids

    # The usage report counts them, beside the prompt tokens they are part of.
    with stack.operator_client() as ops:
        def mine() -> dict | None:
            report = ops.get("/v1/admin/usage", params={"days": 1}).raise_for_status().json()
            return next((t for t in report["by_tenant"] if t["name"] == name and t["requests"] == 3), None)

        wait_for(lambda: mine() is not None, timeout=30, what="the three requests in the usage report")
        row = mine()
    assert row["cached_prompt_tokens"] == cached + streamed
    assert row["prompt_tokens"] == first.usage.prompt_tokens * 2 + chunks[-1].usage.prompt_tokens


def test_a_tenant_finds_only_its_own_prompts_in_the_prefix_cache(stack):
    """Shared across tenants, the prefix cache would let one tenant time whether another's prompts begin with a
    text it guesses; each tenant's requests get a cache salt of their own (services/gateway/cache_salt.py)."""
    keys = {name: credentials.add_app(stack.home / "credentials.json", name)
            for name in (f"salt-a-{uuid.uuid4().hex[:8]}", f"salt-b-{uuid.uuid4().hex[:8]}")}
    wait_until_taken(list(keys.values())[-1], stack.gateway)
    clients = [openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=key, max_retries=0) for key in keys.values()]
    # Long enough to fill a 128-token CPU block; new, so that no earlier request began with it.
    asked = [{"role": "system", "content": f"{uuid.uuid4().hex} " + " ".join(f"Rule {i}: be brief." for i in range(14))},
             {"role": "user", "content": "Say hello."}]

    def cached(client, **extra) -> int:
        reply = client.chat.completions.create(model=MODEL, messages=asked, max_tokens=2, temperature=0, **extra)
        return reply.usage.prompt_tokens_details.cached_tokens

    a, b = clients
    assert cached(a) == 0
    assert cached(a) > 0  # its own prompt, again
    assert cached(b) == 0  # the same prompt from another tenant: computed anew
    assert cached(b) > 0
    # A request's own salt (vLLM's extension) splits its tenant's cache further: per end user, say.
    assert cached(a, extra_body={"cache_salt": "end-user-1"}) == 0
    assert cached(a, extra_body={"cache_salt": "end-user-1"}) > 0


def test_streaming_n2_interleaves_choices(openai_client, stack):
    chunks = list(openai_client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=5, n=2, stream=True, extra_body={"ignore_eos": True}
    ))
    by_index: dict[int, list] = {0: [], 1: []}
    for c in chunks:
        for ch in c.choices:
            by_index[ch.index].append(ch)
    for index, choice_chunks in by_index.items():
        assert choice_chunks[0].delta.role == "assistant"
        assert choice_chunks[-1].finish_reason == "length"
        assert len({ch.completion_id for ch in choice_chunks}) == 1
    assert by_index[0][0].completion_id != by_index[1][0].completion_id


def test_the_sse_wire_format_ends_with_done(stack):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True}
    headers = {"Authorization": f"Bearer {stack.credentials['app_key']}"}
    with httpx.stream("POST", f"{stack.gateway}/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert all(json.loads(d)["object"] == "chat.completion.chunk" for d in data[:-1])


def test_logprobs(openai_client, stack):
    resp = openai_client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=4, logprobs=True, top_logprobs=3, temperature=0,
        extra_body={"ignore_eos": True},
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)


def test_models_route(openai_client):
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["version"] == "1"
    assert models.data[0].model_extra["max_model_len"] == TEST_MAX_MODEL_LEN
    one = openai_client.models.retrieve(MODEL)
    assert (one.id, one.model_extra["version"]) == (MODEL, "1")
    with pytest.raises(openai.NotFoundError) as e:
        openai_client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"


# ---- auth --------------------------------------------------------------------------------------------------


def test_missing_or_wrong_key_is_401_in_openai_format(stack):
    url = f"{stack.gateway}/v1/chat/completions"
    body = {"model": MODEL, "messages": HELLO}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{stack.gateway}/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


def test_sdk_with_a_wrong_key_raises_authentication_error(stack):
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.gateway}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)


def test_operator_key_also_chats_and_metrics_need_it(stack):
    creds = stack.credentials
    r = httpx.post(f"{stack.gateway}/v1/chat/completions",
                   json={"model": MODEL, "messages": HELLO, "max_tokens": 2},
                   headers={"Authorization": f"Bearer {creds['operator_key']}"}, timeout=60)
    assert r.status_code == 200
    assert httpx.get(f"{stack.gateway}/metrics").status_code == 401
    r = httpx.get(f"{stack.gateway}/metrics", headers={"Authorization": f"Bearer {creds['app_key']}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "operator_key_required"
    r = httpx.get(f"{stack.gateway}/metrics", headers={"Authorization": f"Bearer {creds['operator_key']}"})
    assert r.status_code == 200
    assert 'alignloop_gateway_requests_total{route="/v1/chat/completions",status="200"}' in r.text
    assert 'alignloop_completion_records_total{outcome="produced"}' in r.text


def test_health_and_readiness(stack):
    assert httpx.get(f"{stack.gateway}/healthz").json() == {"status": "ok"}
    r = httpx.get(f"{stack.gateway}/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"kafka": True, "policy": True, "feedback": True}


# ---- bad input: 400 naming the field, never 500 -------------------------------------------------------------

LONG = "word " * (TEST_MAX_MODEL_LEN * 2)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": TEST_MAX_MODEL_LEN + 1}, "max_tokens"),
        ({"n": TEST_MAX_N + 1}, "n"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": LONG}]}, "messages"),
        ({"messages": [{"role": "user", "content": LONG}], "stream": True}, "messages"),
        ({"max_tokens": TEST_MAX_MODEL_LEN + 1, "stream": True}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": None}, "model"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias.abc"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),  # checked by the policy service against the vocabulary
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "lookup"}}]}, "tools"),
        ({"functions": [{"name": "lookup"}]}, "functions"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"cache_salt": ""}, "cache_salt"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs"),
        # vLLM's own checks, run by the policy service before it answers, streamed or not
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "(unclosed"}, "stream": True}, "structured_outputs"),
    ],
)
def test_bad_input_is_400_naming_the_field(stack, body, param):
    payload = {"model": MODEL, "messages": HELLO, **body}
    r = httpx.post(f"{stack.gateway}/v1/chat/completions", json=payload, timeout=60,
                   headers={"Authorization": f"Bearer {stack.credentials['app_key']}"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["message"]


def test_malformed_json_is_400(stack):
    r = httpx.post(f"{stack.gateway}/v1/chat/completions", content=b'{"model": "alignloop-policy", "messa',
                   headers={"Authorization": f"Bearer {stack.credentials['app_key']}",
                            "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "body"


def test_unknown_model_is_404(openai_client):
    with pytest.raises(openai.NotFoundError) as err:
        openai_client.chat.completions.create(model="gpt-4", messages=HELLO, max_tokens=2)
    assert err.value.body["param"] == "model"


# ---- cancellation --------------------------------------------------------------------------------------------


def _policy_info(stack) -> pb.GetInfoResponse:
    with grpc.insecure_channel(stack.policy) as channel:
        return pb_grpc.PolicyServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)


def _wait_idle_with_aborts(stack, at_least: int) -> pb.GetInfoResponse:
    deadline = time.monotonic() + 10
    while True:
        info = _policy_info(stack)
        if (info.aborted_requests >= at_least and info.active_requests == 0) or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def test_cancelled_grpc_stream_aborts_the_engine_request(stack):
    before = _policy_info(stack).aborted_requests
    request = pb.GenerateRequest(
        prompt="Once upon a time",
        sampling=pb.SamplingParams(max_tokens=200, ignore_eos=True, temperature=1.0),
    )
    with grpc.insecure_channel(stack.policy) as channel:
        call = pb_grpc.PolicyServiceStub(channel).GenerateStream(request)
        first = next(call)
        assert first.model.name == MODEL
        call.cancel()
    info = _wait_idle_with_aborts(stack, before + 1)
    assert info.aborted_requests == before + 1
    assert info.active_requests == 0


def test_client_leaving_an_sse_stream_aborts_the_engine_request(stack):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 200, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {stack.credentials['app_key']}"}
    # The tiny model can produce 200 tokens before a disconnect travels client -> gateway -> policy -> engine;
    # then there is rightly nothing to abort. So the client leaves mid-stream up to three times and one of
    # those must show the abort; with a broken abort none would, and the test fails.
    for _attempt in range(3):
        before = _policy_info(stack).aborted_requests
        with httpx.stream("POST", f"{stack.gateway}/v1/chat/completions", json=body, headers=headers) as r:
            # Leave once a token has arrived, i.e. once the engine is surely working on the request (the role
            # chunk alone only says the policy accepted it).
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content":"' in line and '"role"' not in line:
                    break
        info = _wait_idle_with_aborts(stack, before + 1)
        if info.aborted_requests == before + 1:
            break
    assert (info.aborted_requests, info.active_requests) == (before + 1, 0), info


def _policy_metrics(stack) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{stack.env['ALIGNLOOP_POLICY_METRICS_PORT']}/metrics", timeout=5).text
    return {f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_policy_metrics_count_calls_by_outcome_beside_vllms_engine_metrics(stack):
    """The policy service's /metrics: its calls by how they ended, the version it serves, and vLLM's engine
    metrics (what replicas are scaled on)."""
    def count(method: str, outcome: str) -> float:
        return _policy_metrics(stack).get(
            f"alignloop_policy_requests_total{{method={method},outcome={outcome}}}", 0.0)

    before = {k: count(*k) for k in [("Generate", "ok"), ("Generate", "invalid"), ("GenerateStream", "cancelled")]}
    tokens_before = _policy_metrics(stack).get("vllm:generation_tokens_total{engine=0,model_name=alignloop-policy}", 0)
    with grpc.insecure_channel(stack.policy) as channel:
        policy = pb_grpc.PolicyServiceStub(channel)
        policy.Generate(pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParams(max_tokens=5, ignore_eos=True)),
                        timeout=60)
        with pytest.raises(grpc.RpcError):
            policy.Generate(pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParams(max_tokens=-1)), timeout=60)
        call = policy.GenerateStream(pb.GenerateRequest(
            prompt="Once upon a time", sampling=pb.SamplingParams(max_tokens=200, ignore_eos=True)))
        next(call)
        call.cancel()
    _wait_idle_with_aborts(stack, 0)
    deadline = time.monotonic() + 10
    while count("GenerateStream", "cancelled") < before[("GenerateStream", "cancelled")] + 1:
        assert time.monotonic() < deadline, "the cancelled stream was not counted"
        time.sleep(0.05)
    assert count("Generate", "ok") == before[("Generate", "ok")] + 1
    assert count("Generate", "invalid") == before[("Generate", "invalid")] + 1
    metrics = _policy_metrics(stack)
    assert metrics["alignloop_policy_served_version{alias=champion,model=alignloop-policy}"] >= 1
    # vLLM's own, from the same engine: the 5 tokens generated above at least.
    assert metrics["vllm:generation_tokens_total{engine=0,model_name=alignloop-policy}"] >= tokens_before + 5
    assert "vllm:kv_cache_usage_perc{engine=0,model_name=alignloop-policy}" in metrics
    assert "vllm:num_requests_waiting{engine=0,model_name=alignloop-policy}" in metrics


def test_unary_generate_returns_token_ids_and_logprobs(stack):
    request = pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]),
        sampling=pb.SamplingParams(max_tokens=5, ignore_eos=True, logprobs=True, n=2, seed=1),
    )
    with grpc.insecure_channel(stack.policy) as channel:
        resp = pb_grpc.PolicyServiceStub(channel).Generate(request, timeout=60)
    assert [c.index for c in resp.completions] == [0, 1]
    for c in resp.completions:
        assert len(c.token_ids) == 5 and len(c.logprobs) == 5
        assert [lp.token_id for lp in c.logprobs] == list(c.token_ids)
        assert all(lp.logprob <= 0 for lp in c.logprobs)
        assert c.finish_reason == "length"
    assert resp.model.version == "1" and resp.prompt_tokens > 0


def test_the_policy_gives_vllm_rendered_prompts_not_the_deprecated_raw_ones(openai_client, stack):
    """vLLM 0.32 still takes a bare {"prompt_token_ids": ...} dict, renders it on a thread pool and warns once
    per process that it will stop; the policy service renders its prompts itself."""
    list(openai_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2, stream=True))
    openai_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    log = (stack.home / "logs" / "policy.log").read_text(errors="replace")
    assert "alignloop.policy: serving" in log  # the log the engine writes to
    warnings = [line for line in log.splitlines()
                if "deprecated" in line and ("input_processor.py" in line or "async_llm.py" in line)]
    assert warnings == []


def test_logit_bias_and_penalties_reach_the_engine(openai_client, stack):
    """OpenAI's logit_bias and penalties are applied by the real engine, not just accepted."""
    def generate(**sampling) -> pb.Completion:
        sampling = {"max_tokens": 16, "ignore_eos": True, "temperature": 0, **sampling}
        request = pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]),
                                     sampling=pb.SamplingParams(**sampling))
        with grpc.insecure_channel(stack.policy) as channel:
            return pb_grpc.PolicyServiceStub(channel).Generate(request, timeout=60).completions[0]

    greedy = list(generate().token_ids)
    first = greedy[0]
    # -100 on the greedy first token: greedy decoding must start elsewhere.
    assert generate(logit_bias={first: -100}).token_ids[0] != first
    # +100 on one token: greedy decoding says nothing else.
    forced = generate(logit_bias={first: 100})
    assert list(forced.token_ids) == [first] * 16
    # Through the gateway, as the openai SDK sends it (token ids as strings): the same text.
    reply = openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16, temperature=0,
        logit_bias={str(first): 100}, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == forced.text
    # Penalties act on tokens the answer already holds: greedy decoding of the random tiny model repeats
    # itself, and each penalty must change what it says.
    assert len(set(greedy)) < len(greedy), "the premise: greedy decoding repeats a token"
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 2.0}):
        assert list(generate(**penalty).token_ids) != greedy, penalty
    # top_k=1 and min_p=1 leave only the likeliest token: sampling at temperature 1 becomes greedy decoding.
    for narrow in ({"top_k": 1}, {"min_p": 1.0}):
        assert list(generate(**{**narrow, "temperature": 1.0, "seed": 3}).token_ids) == greedy, narrow


def test_structured_outputs_constrain_what_the_engine_says(openai_client, stack):
    """response_format and vLLM's structured_outputs, applied by the real engine (random tiny model: only the
    constraint can make its answers well-formed)."""
    hi = [{"role": "user", "content": "hi"}]
    # A JSON schema with a closed set of values: every answer is one of them, as JSON, and ends by itself.
    verdict = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": {"enum": ["yes", "no"]}}}
    reply = openai_client.chat.completions.create(model=MODEL, messages=hi, max_tokens=20, temperature=1.0, seed=1,
                                                  n=4, response_format=verdict)
    for choice in reply.choices:
        assert json.loads(choice.message.content) in ("yes", "no") and choice.finish_reason == "stop"
    records = read_records(stack.kafka, {c.completion_id for c in reply.choices})
    assert {r.sampling.structured_output["json_schema"]["enum"][0] for r in records.values()} == {"yes"}

    # An object schema: each answer that ends by itself (whitespace may run to max_tokens) is a valid instance.
    flag = {"type": "json_schema", "json_schema": {"name": "flag", "schema": {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        "additionalProperties": False}}}
    objects = [c for seed in (1, 2) for c in openai_client.chat.completions.create(
        model=MODEL, messages=hi, max_tokens=200, temperature=1.0, seed=seed, n=4, response_format=flag).choices]
    assert all(c.message.content.startswith("{") for c in objects)
    finished = [json.loads(c.message.content) for c in objects if c.finish_reason == "stop"]
    assert finished, "no answer ended within max_tokens"
    assert all(set(o) == {"ok"} and isinstance(o["ok"], bool) for o in finished)

    # vLLM's extension: a choice, streamed, and a regular expression.
    stream = openai_client.chat.completions.create(
        model=MODEL, messages=hi, max_tokens=10, temperature=1.0, seed=2, stream=True,
        extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) in ("red", "green", "blue")
    digits = openai_client.chat.completions.create(model=MODEL, messages=hi, max_tokens=10, temperature=1.0,
                                                   seed=3, extra_body={"structured_outputs": {"regex": "[0-9]{3}"}})
    assert re.fullmatch("[0-9]{3}", digits.choices[0].message.content)
    # Unconstrained, the same request says something else.
    free = openai_client.chat.completions.create(model=MODEL, messages=hi, max_tokens=10, temperature=1.0, seed=3)
    assert not re.fullmatch("[0-9]{3}", free.choices[0].message.content)
