"""`alignloop pipeline ...` against a fake gateway (httpx.MockTransport): arguments, errors, waiting."""

from __future__ import annotations

import argparse
import json

import httpx
import pytest

from alignloop import pipeline_cli
from alignloop.cli import build_parser
from alignloop.gateway_client import GatewayClient, GatewayError


def run_json(run_id="run-7", status="running", **kw) -> dict:
    steps = kw.pop("steps", [{"name": "snapshot", "status": "succeeded", "started_at": "2025-01-01T00:00:00.000Z",
                              "finished_at": "2025-01-01T00:01:05.000Z", "detail": "412 pairs", "log_path": None,
                              "mlflow_run_id": None, "summary": {}, "progress": 1.0}])
    return {"id": run_id, "object": "pipeline.run", "status": status, "trigger": "operator", "reason": "",
            "created_at": "2025-01-01T00:00:00.000Z", "started_at": "2025-01-01T00:00:00.000Z",
            "finished_at": None, "steps": steps, "mlflow_run_id": None, "error": None, "outcome": None,
            "config": {}, "requested_by": None, "promoted_policy_version": None,
            "promoted_reward_version": None} | kw


def error_json(status: int, message: str, code: str | None = None, **extra) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "invalid_request_error",
                                                  "param": None, "code": code, **extra}})


class FakeGateway:
    """Answers each request with the next of `answers` (a Response, a dict sent as JSON, or an exception)."""

    def __init__(self, *answers) -> None:
        self.answers, self.requests = list(answers), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer if isinstance(answer, httpx.Response) else httpx.Response(200, json=answer)


@pytest.fixture
def gateway(monkeypatch):
    fake = FakeGateway({})
    monkeypatch.setattr(pipeline_cli, "operator_client", lambda: GatewayClient(
        "http://gw", "o-key", transport=httpx.MockTransport(fake)))
    monkeypatch.setattr(pipeline_cli, "POLL_S", 0.0)
    return fake


def cli(*argv: str) -> int:
    args = build_parser().parse_args(["pipeline", *argv])
    return args.func(args)


def test_config_is_a_json_object_or_a_file_holding_one(tmp_path):
    assert pipeline_cli.config_arg('{"ppo": {"iterations": 2}}') == {"ppo": {"iterations": 2}}
    path = tmp_path / "c.json"
    path.write_text('{"reward": {"epochs": 1}}')
    assert pipeline_cli.config_arg(f"@{path}") == {"reward": {"epochs": 1}}
    for bad in ("{nope", "[1, 2]", f"@{tmp_path / 'missing.json'}"):
        with pytest.raises(argparse.ArgumentTypeError):
            pipeline_cli.config_arg(bad)


def test_parser():
    args = build_parser().parse_args(["pipeline", "run", "--reason", "why", "--config", '{"a": 1}', "--wait"])
    assert (args.reason, args.config, args.wait, args.timeout) == ("why", {"a": 1}, True, None)
    assert build_parser().parse_args(["pipeline", "status"]).run_id is None
    assert build_parser().parse_args(["pipeline", "list"]).limit == 20
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pipeline", "run", "--config", "[1]"])


def test_client_sends_the_operator_key_and_words_errors():
    fake = FakeGateway(error_json(400, "from 1 to 200", param="limit"))
    client = GatewayClient("http://gw", "o-key", transport=httpx.MockTransport(fake))
    with pytest.raises(GatewayError) as e:
        client.list_runs(limit=500)
    assert fake.requests[0].headers["authorization"] == "Bearer o-key"
    assert fake.requests[0].url.params["limit"] == "500"
    assert e.value.status == 400 and str(e.value) == "gateway: HTTP 400: limit: from 1 to 200"


def test_client_says_when_the_gateway_is_not_there():
    client = GatewayClient("http://gw", "k", transport=httpx.MockTransport(FakeGateway(httpx.ConnectError("no"))))
    with pytest.raises(GatewayError) as e:
        client.get_run("run-7")
    assert e.value.status is None and "is `alignloop up` running?" in str(e.value)


def test_run_prints_the_id(gateway, capsys):
    gateway.answers = [run_json(status="queued")]
    assert cli("run", "--reason", "why", "--config", '{"ppo": {"iterations": 2}}') == 0
    assert capsys.readouterr().out == "run-7\n"
    assert json.loads(gateway.requests[0].content) == {"reason": "why", "config": {"ppo": {"iterations": 2}}}


def test_run_while_another_is_active_names_it_and_exits_4(gateway, capsys):
    gateway.answers = [error_json(409, "Pipeline run run-6 is already queued or running",
                                  "pipeline_run_in_progress", run_id="run-6")]
    assert cli("run") == 4
    assert "alignloop pipeline cancel run-6" in capsys.readouterr().err


@pytest.mark.parametrize(("final", "exit_code"), [("succeeded", 0), ("failed", 1), ("cancelled", 1)])
def test_run_wait_polls_until_the_end_then_prints_the_run(gateway, capsys, final, exit_code):
    gateway.answers = [run_json(status="queued"), run_json(), run_json(status=final, outcome="not promoted: x")]
    assert cli("run", "--wait") == exit_code
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0])["status"] == final
    assert [r.url.path for r in gateway.requests] == ["/v1/admin/pipelines/runs"] + [
        "/v1/admin/pipelines/runs/run-7"] * 2


def test_run_wait_in_a_log_prints_a_line_per_step_change_then_the_whole_run(gateway, capsys, monkeypatch):
    monkeypatch.setattr(pipeline_cli, "err", pipeline_cli.Console(stderr=True, force_terminal=False, width=120))
    running = {"name": "snapshot", "status": "running", "started_at": "2025-01-01T00:00:00.000Z",
               "finished_at": None, "detail": "", "progress": 0.5}
    gateway.answers = [run_json(status="queued", steps=[running | {"status": "pending", "started_at": None,
                                                                   "progress": 0.0}]),
                       run_json(steps=[running]), run_json(steps=[running]),
                       run_json(status="succeeded", outcome="promoted nothing")]
    assert cli("run", "--wait") == 0
    err = capsys.readouterr().err
    lines = [line.split("] ", 1)[1] for line in err.splitlines() if line.startswith("[")]
    assert lines == ["run-7 snapshot running 50%", "run-7 snapshot succeeded after 1m05s: 412 pairs"]
    # Then the run's table, as a terminal would have shown it last, ending its line.
    assert err.index("run-7 snapshot succeeded") < err.index("pipeline run run-7: succeeded")
    assert err.rstrip(" \n").endswith("outcome: promoted nothing") and err.endswith("\n")


def test_run_wait_gives_up_after_the_timeout(gateway, capsys):
    gateway.answers = [run_json(status="queued"), run_json()]
    assert cli("run", "--timeout", "0.001") == pipeline_cli.EXIT_TIMEOUT


def test_status_defaults_to_the_newest_run(gateway, capsys):
    gateway.answers = [{"object": "list", "data": [run_json()]}]
    assert cli("status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["id"] == "run-7"
    assert gateway.requests[0].url.params["limit"] == "1"


def test_cancel_a_promoting_run_exits_4(gateway, capsys):
    gateway.answers = [error_json(409, "Pipeline run run-7 cannot be cancelled: promoting", "run_not_cancellable")]
    assert cli("cancel", "run-7") == 4
    assert "cannot be cancelled" in capsys.readouterr().err


def test_views_render(capsys):
    run = run_json(steps=run_json()["steps"] + [{**run_json()["steps"][0], "name": "ppo", "status": "running",
                                                 "finished_at": None, "progress": 0.42}])
    pipeline_cli.out.print(pipeline_cli.run_view(run))
    pipeline_cli.out.print(pipeline_cli.runs_view([run]))
    text = capsys.readouterr().out
    assert "1m05s" in text and "running 42%" in text and "run-7" in text


def test_duration():
    assert pipeline_cli.duration(None, None) == "-"
    assert pipeline_cli.duration("2025-01-01T00:00:00.000Z", "2025-01-01T01:02:03.000Z") == "1h02m"
    assert pipeline_cli.duration("2025-01-01T00:00:00.000Z", "2025-01-01T00:00:09.500Z") == "9s"


# ---- alignloop models versions / canary ------------------------------------------------------------------


@pytest.fixture
def models_gateway(monkeypatch):
    from alignloop import models_cli

    fake = FakeGateway({})

    def client() -> GatewayClient:
        return GatewayClient("http://gw", "o-key", transport=httpx.MockTransport(fake))

    # The commands' own calls, and those of the report helper they share.
    monkeypatch.setattr(models_cli, "operator_client", client)
    monkeypatch.setattr(pipeline_cli, "operator_client", client)
    return fake


def models(*argv: str) -> int:
    args = build_parser().parse_args(["models", *argv])
    return args.func(args)


def test_models_canary_sets_and_clears_the_split(models_gateway, capsys):
    models_gateway.answers = [{"model": "alignloop-policy", "champion": "2", "challenger": "3", "canary_percent": 20,
                               "previous_champion": None}]
    assert models("canary", "3", "--percent", "20") == 0
    sent = models_gateway.requests[-1]
    assert (sent.method, sent.url.path) == ("PUT", "/v1/admin/models/canary")
    assert json.loads(sent.content) == {"version": "3", "percent": 20, "reason": ""}
    assert "challenger v3 gets 20%" in capsys.readouterr().out
    models_gateway.answers = [{"model": "alignloop-policy", "champion": "2", "challenger": None, "canary_percent": 0,
                               "previous_champion": None}]
    assert models("canary", "--clear") == 0
    assert models_gateway.requests[-1].method == "DELETE" and "no canary" in capsys.readouterr().out
    assert models("canary") == 2 and models("canary", "3", "--clear") == 2  # one or the other
    models_gateway.answers = [httpx.Response(400, json={"error": {"message": "percent: too big", "param": "percent",
                                                                  "type": "invalid_request_error", "code": None}})]
    assert models("canary", "3", "--percent", "101") == pipeline_cli.EXIT_REFUSED


def test_models_versions_prints_a_table_or_json(models_gateway, capsys):
    listing = {"object": "list", "model": "alignloop-policy", "days": 30, "champion": "2",
               "canary": {"version": "3", "percent": 10, "serving": True},
               "data": [{"version": "3", "aliases": ["challenger"], "created_at": None, "run_id": None,
                         "traffic_percent": 10, "responses": 4, "completions": 4, "tags": {},
                         "feedback": {"total": 2, "thumbs_up": 1, "thumbs_down": 1, "thumbs_up_rate": 0.5,
                                      "ratings": 0, "rating_mean": None, "rankings": 0, "comparisons": 0,
                                      "corrections": 0, "flagged": 0}}]}
    models_gateway.answers = [listing]
    assert models("versions", "--days", "7") == 0
    assert models_gateway.requests[-1].url.params["days"] == "7"
    text = capsys.readouterr().out
    assert "challenger" in text and "50.0%" in text and "canary: v3 at 10%" in text
    assert models("versions", "--json") == 0
    assert json.loads(capsys.readouterr().out) == listing
