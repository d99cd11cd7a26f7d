"""Per-tenant rate limits on the real stack: two gateway replicas in front of the stack's vLLM policy, sharing
their buckets in the machine's Redis, answering the official `openai` SDK."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from alignloop import credentials
from tests.conftest import REDIS_URL, Stack, wait_until_taken
from tests.integration.processes import gateway_replica

pytestmark = pytest.mark.integration

MODEL = "alignloop-policy"
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def replicas(stack: Stack, tmp_path_factory) -> Iterator[list[str]]:
    logs = tmp_path_factory.mktemp("gateway-replicas")
    with contextlib.ExitStack() as running:
        yield [running.enter_context(gateway_replica(stack, logs, ALIGNLOOP_RATE_LIMIT_REDIS_URL=REDIS_URL))
               for _ in range(2)]


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def new_app(stack: Stack, **limits: int) -> str:
    """A new application (a tenant of its own, so no run shares a bucket with another) with these limits."""
    name = f"limited-{uuid.uuid4().hex[:8]}"
    path = stack.home / "credentials.json"
    key = credentials.add_app(path, name)
    credentials.set_limits(path, name, **limits)
    return key


def chat(openai_client: openai.OpenAI, **kw):
    return openai_client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=4,
                                                                    **kw)


def test_a_tenants_request_limit_holds_across_replicas_and_spares_other_tenants(stack, replicas):
    key = new_app(stack, requests_per_minute=4)
    wait_until_taken(key, *replicas)
    remaining = []
    for i in range(4):
        raw = chat(client(replicas[i % 2], key))
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
        assert raw.headers["x-ratelimit-limit-requests"] == "4"
    assert remaining == ["3", "2", "1", "0"]  # one bucket, whichever replica answered
    for url in replicas:
        with pytest.raises(openai.RateLimitError) as e:
            chat(client(url, key))
        assert e.value.code == "rate_limit_exceeded" and e.value.type == "requests"
        # One request comes back every 15 s.
        assert 13 <= int(e.value.response.headers["retry-after"]) <= 15
    # Another application, without limits of its own (and the gateway's default is none), is not held up.
    other = credentials.add_app(stack.home / "credentials.json", f"unlimited-{uuid.uuid4().hex[:8]}")
    wait_until_taken(other, *replicas)
    for url in replicas:
        raw = chat(client(url, other))
        assert "x-ratelimit-limit-requests" not in raw.headers
    metrics = httpx.get(f"{replicas[0]}/metrics",
                        headers={"Authorization": f"Bearer {stack.credentials['operator_key']}"}).text
    assert 'alignloop_gateway_rate_limited_total{limit="requests"}' in metrics


def test_streamed_tokens_are_spent_and_then_the_tenant_waits(stack, replicas):
    key = new_app(stack, tokens_per_minute=40)
    wait_until_taken(key, *replicas)
    url = replicas[0]
    stream = client(url, key).chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=48, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    usage = [chunk.usage for chunk in stream if chunk.usage][0]
    assert usage.total_tokens > 40  # more than a minute's worth: the bucket is now in debt
    # The stream's tokens are taken from the bucket as it ends; the next request, on either replica, waits.
    for other in replicas:
        with pytest.raises(openai.RateLimitError) as e:
            for _ in range(20):  # the charge lands a moment after the stream's last event
                chat(client(other, key))
        assert e.value.type == "tokens"
        assert int(e.value.response.headers["x-ratelimit-remaining-tokens"]) == 0
