"""Tenant priorities on real vLLM: a policy service whose engine uses the priority scheduling policy, with a
batch of one so that every request but one waits, behind a gateway replica of the stack. The engine must take
waiting requests by priority (a tenant's, or a later one the request asks for) and then by arrival."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from alignloop import credentials
from tests.conftest import TEST_MAX_MODEL_LEN, Stack, wait_until_taken
from tests.integration.processes import gateway_replica, policy_replica

pytestmark = pytest.mark.integration

MODEL = "alignloop-policy"
FIRST_N = 8  # the first request's answers: about 0.8 s each on 2 cores, against 0.4 s to set the queue up


@pytest.fixture(scope="module")
def priority_gateway(stack: Stack, tmp_path_factory) -> Iterator[tuple[str, int]]:
    """A gateway in front of its own policy service (priority scheduling, one sequence at a time); the gateway's
    URL and the policy's metrics port."""
    logs = tmp_path_factory.mktemp("priorities")
    with policy_replica(stack, logs, ALIGNLOOP_SCHEDULING_POLICY="priority", ALIGNLOOP_MAX_NUM_SEQS="1") as (
            port, metrics_port):
        with gateway_replica(stack, logs, ALIGNLOOP_POLICY_PORT=str(port), ALIGNLOOP_MAX_N=str(FIRST_N)) as url:
            yield url, metrics_port


def new_app(stack: Stack, url: str, prefix: str, priority: int | None = None) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    path = stack.home / "credentials.json"
    key = credentials.add_app(path, name)
    credentials.set_priority(path, name, priority)
    wait_until_taken(key, url)
    return key


def test_the_engine_takes_waiting_requests_by_priority_then_arrival(stack, priority_gateway):
    url, metrics_port = priority_gateway
    batch = new_app(stack, url, "batch", priority=10)
    chat_ui = new_app(stack, url, "chat-ui")  # the default priority, 0

    async def scenario() -> list[str]:
        finished: list[str] = []
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            async def engine() -> tuple[float, float]:
                """Requests running and waiting in the engine, from vLLM's own gauges."""
                text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
                samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
                return tuple(sum(s.value for s in samples if s.name == f"vllm:num_requests_{state}")
                             for state in ("running", "waiting"))

            async def until_waiting(n: int) -> None:
                for _ in range(1000):
                    if await engine() == (1, n):
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError(f"the engine never had 1 request running and {n} waiting")

            async def chat(label: str, key: str, max_tokens: int, **extra) -> None:
                body = {"model": MODEL, "messages": [{"role": "user", "content": label}], "max_tokens": max_tokens,
                        "ignore_eos": True, "temperature": 0, **extra}
                r = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200, r.text
                if extra.get("stream"):
                    assert r.text.rstrip().endswith("data: [DONE]")
                finished.append(label)

            # The first holds the engine for a while: its n answers (as long as the context allows) are n engine
            # requests, run one after another, the others waiting. The rest queue behind it in this order of
            # arrival, each sent once the one before is in the engine's queue.
            started = time.monotonic()
            tasks = [asyncio.create_task(chat("batch-1", batch, TEST_MAX_MODEL_LEN - 20, n=FIRST_N,
                                                  temperature=1))]
            await until_waiting(FIRST_N - 1)
            queued = [("batch-2", batch, {}), ("batch-3", batch, {}), ("chat-ui-deferred", chat_ui, {"priority": 20}),
                      ("batch-4", batch, {}), ("chat-ui", chat_ui, {"stream": True})]
            for n, (label, key, extra) in enumerate(queued, start=FIRST_N):
                tasks.append(asyncio.create_task(chat(label, key, 8, **extra)))
                await until_waiting(n)
            setup_s = time.monotonic() - started
            assert not finished, f"{finished} finished within the {setup_s:.1f} s the queue took to set up"
            await asyncio.gather(*tasks)
        return finished

    # Arrival order would finish batch-1..3, chat-ui-deferred, batch-4, chat-ui. The chat UI's request (priority
    # 0) goes ahead of everything the batch tenant (10) has waiting, batch-1's remaining answers included; the
    # batch tenant's requests keep their order; the one the chat UI deferred (20) goes last, behind requests
    # that came after it.
    assert asyncio.run(scenario()) == ["chat-ui", "batch-1", "batch-2", "batch-3", "batch-4", "chat-ui-deferred"]
