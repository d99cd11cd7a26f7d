"""The reward service as a real process against a real MLflow server, with the tiny placeholder RM registered:
scores equal to RewardModel.score in-process, batching across calls, bad input, and a hot swap under load."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import grpc
import pytest

from alignloop.contracts import PARAM_METADATA_KEY
from alignloop.reward_model import render
from alignloop.v1 import policy_pb2
from alignloop.v1 import reward_pb2 as pb
from alignloop.v1 import reward_pb2_grpc as pb_grpc
from tests.integration.reward_stack import RewardStack, reward_settings

pytestmark = pytest.mark.integration

MAX_BATCH = 8
MAX_ITEMS = 32
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def rstack(tmp_path_factory) -> RewardStack:
    settings = reward_settings(tmp_path_factory.mktemp("reward"), reward_max_batch=MAX_BATCH,
                               reward_max_items=MAX_ITEMS, reward_max_wait_ms=20.0)
    stack = RewardStack(settings)
    try:
        stack.up(tiny=True)
        yield stack
    finally:
        stack.down()


def conversation(i: int) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}]
    if i % 3 == 0:
        messages.insert(0, {"role": "system", "content": "Answer briefly."})
    if i % 4 == 1:
        messages += [{"role": "assistant", "content": "Let me think."}, {"role": "user", "content": "Go on."}]
    return messages


def answer(i: int) -> str:
    return f"It is {2 * i}." + " Really." * (i % 7)


def request_for(indices: list[int]) -> pb.ScoreRequest:
    return pb.ScoreRequest(items=[
        pb.ScoreItem(messages=[policy_pb2.ChatMessage(**m) for m in conversation(i)], response=answer(i))
        for i in indices
    ])


def expected(rstack: RewardStack, version: str, indices: list[int]) -> list[float]:
    model, tokenizer = rstack.in_process(version)
    return model.score(tokenizer, [render(conversation(i), answer(i)) for i in indices])


def close(got, want) -> bool:
    return len(got) == len(want) and all(math.isclose(g, w, abs_tol=TOLERANCE) for g, w in zip(got, want))


def test_score_matches_the_model_in_process_and_is_deterministic(rstack: RewardStack) -> None:
    indices = list(range(12))
    with grpc.insecure_channel(rstack.target) as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        first = stub.Score(request_for(indices), timeout=30)
        second = stub.Score(request_for(indices), timeout=30)
        one = stub.Score(request_for([5]), timeout=30)
    assert (first.model.name, first.model.version) == ("alignloop-reward", "1")
    assert len(first.rewards) == len(indices)
    assert all(isinstance(r, float) and math.isfinite(r) for r in first.rewards)
    assert list(first.rewards) == list(second.rewards)
    want = expected(rstack, "1", indices)
    assert close(first.rewards, want), (list(first.rewards), want)
    # The placeholder's random head still tells inputs apart.
    assert len({round(r, 6) for r in first.rewards}) > 1
    # An item's reward does not depend on the company it is scored in (padding, batch position).
    assert math.isclose(one.rewards[0], first.rewards[5], abs_tol=TOLERANCE)


def test_get_info_reports_the_served_placeholder(rstack: RewardStack) -> None:
    info = rstack.info()
    assert info.ready
    assert (info.model.name, info.model.version, info.alias) == ("alignloop-reward", "1", "champion")
    assert info.untrained  # registered by the bootstrap with alignloop.untrained=true
    assert info.device == "cpu"
    assert (info.max_batch, info.max_items) == (MAX_BATCH, MAX_ITEMS)

    from mlflow import MlflowClient

    uri = rstack.settings.tracking_uri
    mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("alignloop-reward", "1")
    assert mv.tags["alignloop.untrained"] == "true" and mv.tags["kind"] == "placeholder"
    assert list(mv.aliases) == ["champion"]


def _batch_histogram(rstack: RewardStack) -> tuple[float, float, float]:
    """(forward passes, items, forward passes with at most MAX_BATCH items) so far."""
    m = rstack.metrics()
    count = m[("alignloop_reward_batch_size_count", ())]
    total = m[("alignloop_reward_batch_size_sum", ())]
    within = m[("alignloop_reward_batch_size_bucket", (("le", f"{float(MAX_BATCH)}"),))]
    return count, total, within


def test_concurrent_calls_are_batched(rstack: RewardStack) -> None:
    calls = 48
    before = _batch_histogram(rstack)

    async def main():
        async with grpc.aio.insecure_channel(rstack.target) as channel:
            stub = pb_grpc.RewardServiceStub(channel)
            return await asyncio.gather(*(stub.Score(request_for([i]), timeout=30) for i in range(calls)))

    responses = asyncio.run(main())
    after = _batch_histogram(rstack)
    forwards, items, within = (a - b for a, b in zip(after, before))
    assert items == calls
    assert forwards < calls, f"{calls} concurrent single-item calls took {forwards} forward passes"
    assert within == forwards, "a forward pass was larger than reward_max_batch"
    want = expected(rstack, "1", list(range(calls)))
    assert close([r.rewards[0] for r in responses], want)
    ok = rstack.metrics()[("alignloop_reward_requests_total", (("outcome", "ok"),))]
    assert ok >= calls


def _item(role: str = "user", response: str = "fine", messages: bool = True) -> pb.ScoreItem:
    return pb.ScoreItem(messages=[policy_pb2.ChatMessage(role=role, content="hi")] if messages else [],
                        response=response)


@pytest.mark.parametrize(("items", "param"), [
    ([], "items"),
    ([_item()] * (MAX_ITEMS + 1), "items"),
    ([_item(), _item(messages=False)], "items[1].messages"),
    ([_item(), _item(), _item(), _item(response="")], "items[3].response"),
    ([_item(role="robot")], "items[0].messages[0].role"),
    ([_item(role="")], "items[0].messages[0].role"),
], ids=["empty", "too-many", "no-messages", "empty-response", "unknown-role", "no-role"])
def test_bad_input_is_invalid_argument_naming_the_field(rstack: RewardStack, items, param: str) -> None:
    with grpc.insecure_channel(rstack.target) as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Score(pb.ScoreRequest(items=items), timeout=30)
        err = caught.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(err.trailing_metadata())[PARAM_METADATA_KEY] == param
        assert param in err.details()
        # The service is unharmed.
        assert len(stub.Score(request_for([1, 2]), timeout=30).rewards) == 2
    assert rstack.procs["reward"].poll() is None


def test_hot_swap_under_load(rstack: RewardStack, tmp_path: Path) -> None:
    """Concurrent calls, each spanning several forward passes (24 items, max_batch 8), keep running while a
    new version is registered and @champion moves to it: every call succeeds, is scored entirely by the one
    version it names (its rewards equal that version's in-process scores), and once a client has seen the new
    version it never gets the old one again."""
    from pipelines.models_init import build_tiny_reward_model

    indices = list(range(24))
    old = expected(rstack, "1", indices)
    v2 = rstack.register(build_tiny_reward_model(tmp_path / "v2", seed=1))  # no alias yet
    new = expected(rstack, v2.version, indices)
    assert not close(old, new), "the two versions must score differently for this test to mean anything"

    clients, settle_s = 8, 1.0
    swapped_at: list[float] = []

    async def client(stub, seen: list) -> None:
        while True:
            response = await stub.Score(request_for(indices), timeout=60)
            seen.append((time.monotonic(), response.model.version, list(response.rewards)))
            settled = swapped_at and time.monotonic() > swapped_at[0] + settle_s
            if settled and response.model.version == v2.version:
                return

    async def main():
        async with grpc.aio.insecure_channel(rstack.target) as channel:
            stub = pb_grpc.RewardServiceStub(channel)
            seen = [[] for _ in range(clients)]
            tasks = [asyncio.create_task(client(stub, s)) for s in seen]
            await asyncio.sleep(1.5)  # under load before the swap
            await asyncio.to_thread(rstack.set_alias, v2.version)
            swapped_at.append(time.monotonic())
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
            return seen

    seen = asyncio.run(main())
    versions = {version for per_client in seen for _, version, _ in per_client}
    assert versions == {"1", v2.version}, versions
    for per_client in seen:
        got = [version for _, version, _ in per_client]
        # Monotonic: no call gets the old version after the client saw the new one.
        assert got == sorted(got, key=int), got
        for _, version, rewards in per_client:
            assert close(rewards, old if version == "1" else new), (version, rewards)
    assert sum(version == "1" for per_client in seen for _, version, _ in per_client) >= clients

    info = rstack.info()
    assert (info.model.version, info.swaps, info.untrained) == (v2.version, 1, False)
    m = rstack.metrics()
    assert m[("alignloop_reward_swaps_total", ())] == 1
    served = ("alignloop_reward_served_version", (("alias", "champion"), ("model", "alignloop-reward")))
    assert m[served] == int(v2.version)
    assert m.get(("alignloop_reward_requests_total", (("outcome", "error"),)), 0) == 0
    # New calls are scored by the new version.
    with grpc.insecure_channel(rstack.target) as channel:
        after = pb_grpc.RewardServiceStub(channel).Score(request_for(indices), timeout=30)
    assert after.model.version == v2.version and close(after.rewards, new)


def test_no_registered_model_stops_the_service_with_a_clear_message(tmp_path: Path) -> None:
    stack = RewardStack(reward_settings(tmp_path / "home"))
    stack.settings.ensure_dirs()
    stack.start("mlflow")
    try:
        with pytest.raises(RuntimeError, match="exited") as failed:
            stack.start("reward")
        assert "registers a placeholder reward model" in str(failed.value)
    finally:
        stack.down()
