"""The gateway's operator routes for pipeline runs, with a fake runner stub in place of the gRPC service."""

from __future__ import annotations

import json

import grpc
import pytest
from fastapi.testclient import TestClient

from alignloop.config import Settings
from alignloop.contracts import PARAM_METADATA_KEY, RUN_ID_METADATA_KEY
from alignloop.credentials import Credentials, key_hash
from alignloop.v1 import pipeline_pb2 as pb
from services.gateway.app import create_app
from services.gateway.auth import KeyRing
from services.gateway.errors import from_rpc_error
from services.gateway.pipelines import PipelineApi, iso_time

APP = {"Authorization": "Bearer a-key"}
OPERATOR = {"Authorization": "Bearer o-key"}
BASE = "/v1/admin/pipelines/runs"

RUN = pb.PipelineRun(
    run_id="run-7", status="running", trigger="operator", reason="new feedback", created_at=1_700_000_000.25,
    started_at=1_700_000_001.0, config_json='{"ppo": {"iterations": 2}}', requested_by=key_hash("o-key"),
    steps=[
        pb.PipelineStep(name="snapshot", status="succeeded", started_at=1_700_000_001.0,
                        finished_at=1_700_000_003.0, detail="412 pairs", summary_json='{"pairs": 412}',
                        progress=1.0, log_path="/tmp/logs/snapshot.log"),
        pb.PipelineStep(name="reward_train", status="pending"),
    ],
)


def rpc_error(code: grpc.StatusCode, details: str, **trailing: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing.items()), details)


class FakeRunner:
    """Answers every call with `answer` (a PipelineRun, a ListRunsResponse or an error to raise)."""

    def __init__(self, answer=RUN) -> None:
        self.answer, self.sent = answer, []

    async def _call(self, request, timeout=None):
        self.sent.append(request)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    StartRun = GetRun = ListRuns = CancelRun = _call


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def client(tmp_path, runner) -> TestClient:
    app = create_app(Settings(home=tmp_path))
    # No lifespan (no `with`): the state it would build is set here instead.
    app.state.keys = KeyRing(Credentials(app_key="a-key", operator_key="o-key"))
    app.state.pipeline = PipelineApi(runner)
    return TestClient(app)


ROUTES = [("post", BASE), ("get", BASE), ("get", f"{BASE}/run-7"), ("post", f"{BASE}/run-7/cancel")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_routes_need_an_operator_key(client, runner, method, path):
    no_key = client.request(method, path)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    app_key = client.request(method, path, headers=APP)
    assert app_key.status_code == 403 and app_key.json()["error"]["code"] == "operator_key_required"
    assert runner.sent == []


def test_start_returns_202_with_the_run_mapped(client, runner):
    body = {"reason": "new feedback", "config": {"ppo": {"iterations": 2}}}
    r = client.post(BASE, headers=OPERATOR, json=body)
    assert r.status_code == 202 and r.headers["location"] == f"{BASE}/run-7"
    sent = runner.sent[0]
    assert (sent.trigger, sent.reason, sent.requested_by) == ("operator", "new feedback", key_hash("o-key"))
    assert json.loads(sent.config_json) == {"ppo": {"iterations": 2}}
    run = r.json()
    assert (run["id"], run["object"], run["status"], run["trigger"]) == ("run-7", "pipeline.run", "running",
                                                                       "operator")
    assert run["created_at"] == "2023-11-14T22:13:20.250Z"
    assert run["finished_at"] is None and run["error"] is None and run["outcome"] is None
    assert run["config"] == {"ppo": {"iterations": 2}}
    snapshot, reward = run["steps"]
    assert snapshot["summary"] == {"pairs": 412} and snapshot["detail"] == "412 pairs"
    assert snapshot["finished_at"] == "2023-11-14T22:13:23.000Z" and snapshot["progress"] == 1.0
    assert reward == {"name": "reward_train", "status": "pending", "started_at": None, "finished_at": None,
                      "detail": "", "log_path": None, "mlflow_run_id": None, "summary": {}, "progress": 0.0}


def test_start_without_a_body_sends_no_config(client, runner):
    assert client.post(BASE, headers=OPERATOR).status_code == 202
    assert (runner.sent[0].reason, runner.sent[0].config_json) == ("", "")


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", "body"),
    (json.dumps({"config": [1, 2]}).encode(), "config"),
    (json.dumps({"config": "ppo.iterations=2"}).encode(), "config"),
    (json.dumps({"reason": "x" * 501}).encode(), "reason"),
    (json.dumps({"reasons": "typo"}).encode(), "reasons"),
])
def test_start_refuses_a_bad_body_naming_the_field(client, runner, body, param):
    r = client.post(BASE, headers={**OPERATOR, "Content-Type": "application/json"}, content=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param
    assert runner.sent == []


def test_start_while_a_run_is_active_is_a_409_naming_it(client, runner):
    runner.answer = rpc_error(grpc.StatusCode.ALREADY_EXISTS, "a run is active",
                              **{RUN_ID_METADATA_KEY: "run-6"})
    r = client.post(BASE, headers=OPERATOR, json={})
    assert r.status_code == 409
    error = r.json()["error"]
    assert error["code"] == "pipeline_run_in_progress" and error["run_id"] == "run-6"
    assert "run-6" in error["message"]


def test_start_with_a_config_key_the_runner_refuses_is_a_400_naming_it(client, runner):
    runner.answer = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "unknown step setting",
                              **{PARAM_METADATA_KEY: "config.ppo.iteratoins"})
    r = client.post(BASE, headers=OPERATOR, json={"config": {"ppo": {"iteratoins": 2}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "config.ppo.iteratoins"


def test_runner_down_is_a_503_naming_it(client, runner):
    runner.answer = rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    r = client.get(BASE, headers=OPERATOR)
    assert r.status_code == 503 and r.json()["error"]["message"].startswith("pipeline runner: ")


def test_list_passes_the_limit_and_wraps_the_runs(client, runner):
    runner.answer = pb.ListRunsResponse(runs=[RUN, pb.PipelineRun(run_id="run-6", status="succeeded")])
    r = client.get(BASE, headers=OPERATOR, params={"limit": 5})
    assert r.status_code == 200 and runner.sent[0].limit == 5
    body = r.json()
    assert body["object"] == "list" and [run["id"] for run in body["data"]] == ["run-7", "run-6"]
    assert client.get(BASE, headers=OPERATOR).status_code == 200 and runner.sent[1].limit == 20


@pytest.mark.parametrize("limit", ["0", "201", "-1", "many"])
def test_list_refuses_a_limit_out_of_range(client, runner, limit):
    r = client.get(BASE, headers=OPERATOR, params={"limit": limit})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
    assert runner.sent == []


def test_get_an_unknown_run_is_a_404(client, runner):
    runner.answer = rpc_error(grpc.StatusCode.NOT_FOUND, "no such run")
    r = client.get(f"{BASE}/run-404", headers=OPERATOR)
    assert r.status_code == 404 and r.json()["error"]["code"] == "run_not_found"
    assert runner.sent[0].run_id == "run-404"


def test_cancel(client, runner):
    r = client.post(f"{BASE}/run-7/cancel", headers=OPERATOR)
    assert r.status_code == 200 and r.json()["id"] == "run-7" and runner.sent[0].run_id == "run-7"


def test_cancel_a_finished_or_promoting_run_is_a_409(client, runner):
    runner.answer = rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "the run is promoting")
    r = client.post(f"{BASE}/run-7/cancel", headers=OPERATOR)
    assert r.status_code == 409
    error = r.json()["error"]
    assert error["code"] == "run_not_cancellable" and "the run is promoting" in error["message"]
    runner.answer = rpc_error(grpc.StatusCode.NOT_FOUND, "no such run")
    assert client.post(f"{BASE}/run-8/cancel", headers=OPERATOR).status_code == 404


def test_rpc_error_names_the_service_and_defaults_to_the_policy():
    down = rpc_error(grpc.StatusCode.UNAVAILABLE, "down")
    assert from_rpc_error(down).message == "policy service: down"
    assert from_rpc_error(down, "pipeline runner").message == "pipeline runner: down"


def test_iso_time():
    assert iso_time(0) is None
    assert iso_time(1_700_000_000) == "2023-11-14T22:13:20.000Z"
