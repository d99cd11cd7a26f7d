"""Canary routing and the model-version routes of the gateway, with fake gRPC stubs."""

from __future__ import annotations

import asyncio
import json
import os

import grpc
import pytest
from fastapi.testclient import TestClient

from alignloop.config import Settings
from alignloop.contracts import PARAM_METADATA_KEY
from alignloop.grpc_channels import AFFINITY_HEADER, RING_HASH_HEADER_FLAG, service_config
from alignloop.credentials import Credentials
from alignloop.v1 import feedback_pb2 as fpb
from alignloop.v1 import pipeline_pb2 as ppb
from alignloop.v1 import policy_pb2 as pb
from services.gateway.app import create_app
from services.gateway.auth import KeyRing
from services.gateway.chat import ChatService
from services.gateway.models_api import ModelsApi
from services.gateway.protocol import ChatCompletionRequest
from services.gateway.routing import CHALLENGER, CHAMPION, CanaryState, PolicyRouter, bucket, conversation_key

APP = {"Authorization": "Bearer a-key"}
OPERATOR = {"Authorization": "Bearer o-key"}


def rpc_error(code: grpc.StatusCode, details: str, **trailing: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing.items()), details)


class FakePolicy:
    def __init__(self, version: str, *, fail: Exception | None = None, info: pb.GetInfoResponse | None = None):
        self.version, self.fail, self.info, self.calls = version, fail, info, 0

    async def Generate(self, req, timeout=None, metadata=None):
        self.calls += 1
        self.metadata = metadata
        if self.fail:
            raise self.fail
        return pb.GenerateResponse(completions=[pb.Completion(index=0, text="hello", token_ids=[1, 2],
                                                              finish_reason="stop")],
                                   prompt_tokens=3, model=pb.ModelRef(name="alignloop-policy", version=self.version))

    async def GetInfo(self, req, timeout=None):
        if isinstance(self.info, Exception):
            raise self.info
        return self.info


class FakeLog:
    def __init__(self) -> None:
        self.records = []

    def submit(self, record) -> None:
        self.records.append(record)


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="alignloop-policy", messages=[{"role": "user", "content": "hi"}], **kw)


# ---- the router ------------------------------------------------------------------------------------------


def test_without_an_active_canary_the_champion_answers_everything():
    champion, canary = FakePolicy("1"), FakePolicy("2")
    router = PolicyRouter(champion, canary, rng=lambda: 0.0)
    for state in (CanaryState(), CanaryState(version="2", percent=50, ready=False),
                  CanaryState(version="2", percent=0, ready=True)):
        router.state = state
        assert router.choose("k", None) == (champion, CHAMPION)


def test_the_share_splits_random_requests_and_keeps_a_user_on_one_side():
    champion, canary = FakePolicy("1"), FakePolicy("2")
    draws = iter([0.05, 0.25, 0.19, 0.99])
    router = PolicyRouter(champion, canary, rng=lambda: next(draws))
    router.state = CanaryState(version="2", percent=20, ready=True)
    assert [router.choose("k", None)[1] for _ in range(4)] == [CHALLENGER, CHAMPION, CHALLENGER, CHAMPION]
    # A user's bucket is fixed: the same side every time, whatever the random draws say.
    users = [f"user-{i}" for i in range(400)]
    sides = {u: router.choose("k", u)[1] for u in users}
    assert all(router.choose("k", u)[1] == sides[u] for u in users)
    share = sum(side == CHALLENGER for side in sides.values()) / len(users)
    assert 0.12 < share < 0.28  # ~20% of users
    assert all(sides[u] == (CHALLENGER if bucket("k", u) < 20 else CHAMPION) for u in users)
    assert bucket("k", "user-1") != bucket("other-key", "user-1") or bucket("k", "user-2") != bucket("x", "user-2")


def test_refresh_reads_the_canary_service_and_an_unreachable_one_is_inactive():
    info = pb.GetInfoResponse(model=pb.ModelRef(name="alignloop-policy", version="4"), ready=True,
                              canary_percent=30, alias="challenger")
    canary = FakePolicy("4", info=info)
    router = PolicyRouter(FakePolicy("1"), canary)
    assert asyncio.run(router.refresh()) == CanaryState(version="4", percent=30, ready=True)
    canary.info = rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
    assert not asyncio.run(router.refresh()).active


def test_an_unreachable_challenger_hands_the_request_to_the_champion():
    champion = FakePolicy("1")
    canary = FakePolicy("2", fail=rpc_error(grpc.StatusCode.UNAVAILABLE, "gone"))
    router = PolicyRouter(champion, canary, rng=lambda: 0.0)
    router.state = CanaryState(version="2", percent=100, ready=True)
    log = FakeLog()
    out = asyncio.run(ChatService(router, log, 10).complete(chat(), "k"))
    assert out.system_fingerprint == "alignloop-policy/v1" and log.records[0].model_version == "1"
    assert (canary.calls, champion.calls) == (1, 1)
    assert not router.state.active  # no more traffic to it until a poll finds it ready


def test_a_challengers_answer_is_recorded_under_its_version_and_its_own_errors_are_not_retried():
    champion, canary = FakePolicy("1"), FakePolicy("2")
    router = PolicyRouter(champion, canary, rng=lambda: 0.0)
    router.state = CanaryState(version="2", percent=100, ready=True)
    log = FakeLog()
    asyncio.run(ChatService(router, log, 10).complete(chat(), "k"))
    assert log.records[0].model_version == "2" and champion.calls == 0
    canary.fail = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "too long", **{PARAM_METADATA_KEY: "messages"})
    with pytest.raises(Exception) as err:
        asyncio.run(ChatService(router, log, 10).complete(chat(), "k"))
    assert getattr(err.value, "status_code", None) == 400 and champion.calls == 0


# ---- conversation affinity -------------------------------------------------------------------------------


def test_every_turn_of_a_conversation_has_one_affinity_key_and_other_conversations_others():
    opening = [("system", "Be brief."), ("user", "Plan a trip to Lyon.")]
    turns = [opening, opening + [("assistant", "Day 1: ..."), ("user", "And day 2?")],
             opening + [("assistant", "Day 1: ..."), ("user", "And day 2?"), ("assistant", "..."), ("user", "Thanks")]]
    key = conversation_key("tenant", None, opening)
    assert all(conversation_key("tenant", None, t) == key for t in turns)
    others = {
        conversation_key("other-tenant", None, opening),
        conversation_key("tenant", "user-7", opening),  # the same opening from another end user
        conversation_key("tenant", None, [("system", "Be brief."), ("user", "Plan a trip to Nice.")]),
        conversation_key("tenant", None, [("system", "Be verbose."), ("user", "Plan a trip to Lyon.")]),
        conversation_key("tenant", None, [("user", "Plan a trip to Lyon.")]),
        # Where one message ends and the next begins is part of the key, not only the concatenated text.
        conversation_key("tenant", None, [("system", "Be brief.P"), ("user", "lan a trip to Lyon.")]),
    }
    assert key not in others and len(others) == 6


def test_with_affinity_every_policy_call_carries_its_conversation_key_even_on_the_fallback():
    champion = FakePolicy("1")
    canary = FakePolicy("2", fail=rpc_error(grpc.StatusCode.UNAVAILABLE, "gone"))
    router = PolicyRouter(champion, canary, rng=lambda: 0.0)
    router.state = CanaryState(version="2", percent=100, ready=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    req = ChatCompletionRequest(model="alignloop-policy", messages=messages, user="u1")
    asyncio.run(ChatService(router, FakeLog(), 10, affinity=True).complete(req, "k"))
    expected = ((AFFINITY_HEADER, conversation_key("k", "u1", [("system", "Be brief."), ("user", "hi")])),)
    assert canary.metadata == expected and champion.metadata == expected
    asyncio.run(ChatService(PolicyRouter(champion), FakeLog(), 10).complete(req, "k"))
    assert champion.metadata is None  # round robin: nothing to place the call by


def test_an_affinity_channel_hashes_the_header_on_a_ring_and_turns_on_grpcs_flag_for_it(monkeypatch):
    monkeypatch.delenv(RING_HASH_HEADER_FLAG, raising=False)
    plain = json.loads(service_config(health_checked=True))
    assert plain["loadBalancingConfig"] == [{"round_robin": {}}]
    assert RING_HASH_HEADER_FLAG not in os.environ
    config = json.loads(service_config(health_checked=True, affinity=True))
    assert config["loadBalancingConfig"] == [{"ring_hash_experimental": {"requestHashHeader": AFFINITY_HEADER}}]
    assert config["healthCheckConfig"] == plain["healthCheckConfig"] and config["methodConfig"] == plain["methodConfig"]
    assert os.environ[RING_HASH_HEADER_FLAG] == "true"


# ---- the routes ------------------------------------------------------------------------------------------


VERSIONS = ppb.ListModelVersionsResponse(model="alignloop-policy", canary_percent=25, versions=[
    ppb.ModelVersion(version="3", aliases=["challenger"], created_at=1_700_000_300, run_id="r3"),
    ppb.ModelVersion(version="2", aliases=["champion"], created_at=1_700_000_200, run_id="r2",
                     tags={"alignloop.promotion_reason": "pipeline run x"}),
    ppb.ModelVersion(version="1", aliases=["reference"], created_at=1_700_000_100),
])
STATS = fpb.StatsResponse(
    rows=[fpb.StatsRow(model_name="alignloop-policy", model_version="2", day="2026-11-20", total=4, thumbs_up=1,
                       thumbs_down=1, ratings=2, rating_sum=9),
          fpb.StatsRow(model_name="alignloop-policy", model_version="2", day="2026-11-21", total=2, thumbs_up=2),
          fpb.StatsRow(model_name="alignloop-policy", model_version="3", day="2026-11-21", total=1, thumbs_down=1)],
    served=[fpb.ServedRow(model_name="alignloop-policy", model_version="2", responses=30, completions=40),
            fpb.ServedRow(model_name="alignloop-policy", model_version="3", responses=10, completions=10)],
)


class FakeRunner:
    def __init__(self) -> None:
        self.sent, self.answer = [], None

    async def ListModelVersions(self, request, timeout=None):
        self.sent.append(request)
        return VERSIONS

    async def _move(self, request, timeout=None):
        self.sent.append(request)
        if isinstance(self.answer, Exception):
            raise self.answer
        return ppb.ModelAliases(model="alignloop-policy", champion="2", challenger="3", canary_percent=25)

    SetCanary = ClearCanary = PromoteModel = RollbackModel = _move


class FakeFeedback:
    async def Stats(self, request, timeout=None):
        self.days = request.days
        return STATS


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def client(tmp_path, runner) -> TestClient:
    app = create_app(Settings(home=tmp_path))
    app.state.keys = KeyRing(Credentials(app_key="a-key", operator_key="o-key"))
    router = PolicyRouter(FakePolicy("2"), FakePolicy("3"))
    router.state = CanaryState(version="3", percent=25, ready=True)
    app.state.models = ModelsApi(runner, FakeFeedback(), router, "alignloop-policy")
    return TestClient(app)


ROUTES = [("get", "/v1/admin/models/versions", None), ("put", "/v1/admin/models/canary", {"version": "3", "percent": 5}),
          ("delete", "/v1/admin/models/canary", None), ("post", "/v1/admin/models/promote", {"version": "3"}),
          ("post", "/v1/admin/models/rollback", None)]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_model_routes_refuse_app_keys(client, runner, method, path, body):
    assert client.request(method, path, json=body).status_code == 401
    answer = client.request(method, path, json=body, headers=APP)
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "operator_key_required"
    assert runner.sent == []


def test_versions_side_by_side(client):
    got = client.get("/v1/admin/models/versions?days=7", headers=OPERATOR)
    assert got.status_code == 200
    body = got.json()
    assert body["champion"] == "2" and body["days"] == 7
    assert body["canary"] == {"version": "3", "percent": 25, "serving": True}
    v3, v2, v1 = body["data"]
    assert (v3["traffic_percent"], v2["traffic_percent"], v1["traffic_percent"]) == (25, 75, 0)
    assert (v2["responses"], v2["completions"], v3["responses"], v1["responses"]) == (30, 40, 10, 0)
    assert v2["feedback"]["total"] == 6 and v2["feedback"]["thumbs_up_rate"] == pytest.approx(0.75)
    assert v2["feedback"]["rating_mean"] == pytest.approx(4.5)
    assert v3["feedback"]["thumbs_up_rate"] == 0.0 and v1["feedback"]["thumbs_up_rate"] is None
    assert v2["tags"]["alignloop.promotion_reason"] == "pipeline run x" and v1["created_at"].startswith("2023-")


def test_canary_request_is_checked_and_forwarded(client, runner):
    bad = client.put("/v1/admin/models/canary", json={"version": "3", "percent": 101}, headers=OPERATOR)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "percent"
    missing = client.put("/v1/admin/models/canary", json={"percent": 5}, headers=OPERATOR)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "version"
    assert runner.sent == []
    ok = client.put("/v1/admin/models/canary", json={"version": "3", "percent": 10}, headers=OPERATOR)
    assert ok.status_code == 200 and ok.json()["challenger"] == "3"
    assert (runner.sent[0].version, runner.sent[0].percent) == ("3", 10)


@pytest.mark.parametrize(("code", "status", "param"), [
    (grpc.StatusCode.INVALID_ARGUMENT, 400, "version"), (grpc.StatusCode.NOT_FOUND, 404, "version"),
    (grpc.StatusCode.FAILED_PRECONDITION, 409, None), (grpc.StatusCode.UNAVAILABLE, 503, None)])
def test_registry_errors_become_http_errors(client, runner, code, status, param):
    runner.answer = rpc_error(code, "no", **({PARAM_METADATA_KEY: param} if param else {}))
    got = client.post("/v1/admin/models/promote", json={"version": "9"}, headers=OPERATOR)
    assert got.status_code == status and got.json()["error"]["param"] == param
