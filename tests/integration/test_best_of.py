"""Best-of-n serving on the full stack: vLLM samples best_of answers, the reward service scores them, the gateway
returns the n best and records all of them."""

from __future__ import annotations

import grpc
import httpx
import pytest

from alignloop.v1 import policy_pb2 as pb
from alignloop.v1 import reward_pb2, reward_pb2_grpc
from tests.conftest import TEST_MAX_N
from tests.integration.test_chat import HELLO, MODEL, read_records

pytestmark = pytest.mark.integration


def test_best_of_returns_the_n_answers_the_reward_model_likes_most(openai_client, stack):
    resp = openai_client.chat.completions.create(
        model=MODEL, messages=HELLO, n=2, max_tokens=8, temperature=1.0, seed=11, extra_body={"best_of": 4})
    data = resp.model_dump()
    assert len(resp.choices) == 2 and [c.index for c in resp.choices] == [0, 1]
    candidates = data["candidates"]
    assert len(candidates) == 4 and sum(c["shown"] for c in candidates) == 2
    assert data["reward_model"].startswith("alignloop-reward/v")
    scored = [c["reward"] for c in candidates if c["reward"] is not None]
    assert scored == sorted(scored, reverse=True)  # best first
    shown = {c["completion_id"]: c["reward"] for c in candidates if c["shown"]}
    assert {c["completion_id"] for c in data["choices"]} == set(shown)
    assert [c["reward"] for c in data["choices"]] == [c["reward"] for c in candidates[:2]]

    # The rewards are the reward service's own, for the same conversation and answer.
    records = read_records(stack.kafka, {c["completion_id"] for c in candidates})
    assert len(records) == 4
    target = f"127.0.0.1:{stack.env['ALIGNLOOP_REWARD_PORT']}"
    with grpc.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        for c in candidates:
            rec = records[c["completion_id"]]
            assert rec.shown == c["shown"] and rec.sampling.best_of == 4 and rec.sampling.n == 2
            assert rec.reward == c["reward"]
            if rec.response_text:
                direct = stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(
                    messages=[pb.ChatMessage(role="user", content=HELLO[0]["content"])],
                    response=rec.response_text)]), timeout=30)
                assert direct.rewards[0] == pytest.approx(rec.reward, abs=1e-5)
                assert rec.reward_model_version == direct.model.version


@pytest.mark.parametrize("body", [
    {"best_of": 2, "stream": True},
    {"best_of": 1, "n": 2},
    {"best_of": TEST_MAX_N + 1},
    {"best_of": 0},
])
def test_bad_best_of_is_a_400_naming_it(stack, body):
    r = httpx.post(f"{stack.gateway}/v1/chat/completions", timeout=30,
                   headers={"Authorization": f"Bearer {stack.credentials['app_key']}"},
                   json={"model": MODEL, "messages": HELLO, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "best_of"
