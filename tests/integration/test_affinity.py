"""Conversation affinity on real vLLM: a gateway with `ALIGNLOOP_POLICY_ROUTING=conversation` in front of two
policy replicas (the stack's and one more). Every later turn of a conversation must reach the replica that
served its first, which shows as prompt tokens found in that replica's prefix cache; the conversations must
still be shared out between both replicas."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from alignloop import credentials
from tests.conftest import TEST_MAX_MODEL_LEN, Stack, wait_until_taken
from tests.integration.processes import gateway_replica, policy_replica

pytestmark = pytest.mark.integration

MODEL = "alignloop-policy"
CONVERSATIONS = 12  # all on one replica by chance: 2 in 4,096 runs
TURNS = 3


@pytest.fixture(scope="module")
def affinity_gateway(stack: Stack, tmp_path_factory) -> Iterator[tuple[str, list[int]]]:
    """A gateway placing conversations over the stack's policy service and a second replica; its URL and the
    two replicas' metrics ports."""
    logs = tmp_path_factory.mktemp("affinity")
    with policy_replica(stack, logs) as (port, metrics_port):
        replicas = f"ipv4:127.0.0.1:{stack.env['ALIGNLOOP_POLICY_PORT']},127.0.0.1:{port}"
        with gateway_replica(stack, logs, ALIGNLOOP_POLICY_ADDRESS=replicas,
                             ALIGNLOOP_POLICY_ROUTING="conversation") as url:
            yield url, [int(stack.env["ALIGNLOOP_POLICY_METRICS_PORT"]), metrics_port]


def generate_calls(metrics_port: int) -> float:
    """Chat calls a policy replica has answered, from its own metrics."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "alignloop_policy_requests_total" and s.labels.get("method", "").startswith("Generate"))


def test_every_turn_of_a_conversation_reaches_the_replica_that_holds_its_history(stack, affinity_gateway):
    url, metrics_ports = affinity_gateway
    name = f"affinity-{uuid.uuid4().hex[:8]}"
    key = credentials.add_app(stack.home / "credentials.json", name)
    wait_until_taken(key, url)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    before = [generate_calls(p) for p in metrics_ports]

    cached: dict[int, list[int]] = {}
    for c in range(CONVERSATIONS):
        # A system prompt of its own (new first words) that fills vLLM's first KV block (128 tokens on CPU).
        messages = [{"role": "system",
                     "content": f"{uuid.uuid4().hex} " + " ".join(f"Rule {i}: be brief." for i in range(8))},
                    {"role": "user", "content": "Say hello."}]
        for turn in range(TURNS):
            if turn % 2:
                chunks = list(client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=4, temperature=0, stream=True,
                    stream_options={"include_usage": True}))
                answer = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                usage = chunks[-1].usage
            else:
                resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
                answer, usage = resp.choices[0].message.content, resp.usage
            assert usage.prompt_tokens < TEST_MAX_MODEL_LEN - 4
            cached.setdefault(c, []).append(usage.prompt_tokens_details.cached_tokens)
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]

    # The first turn is new to every replica; each later one finds the conversation's earlier prompt cached
    # on the replica it reached. Round robin over two replicas sends the second turn to the other one.
    assert all(turns[0] == 0 for turns in cached.values()), cached
    assert all(t > 0 for turns in cached.values() for t in turns[1:]), cached
    # Both replicas had conversations (a replica that had none could not tell affinity from pinning).
    served = [generate_calls(p) - b for p, b in zip(metrics_ports, before)]
    assert sum(served) == CONVERSATIONS * TURNS and min(served) >= TURNS, served
