"""The pipeline runner in a real stack (`alignloop up`, tiny models, a fast step config): users' traffic and
preferences → an operator-triggered run → RM training → PPO → gates → promotion → serving answers with it."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from mlflow import MlflowClient

from tests.conftest import start_stack

PROMPTS = [f"Tell me something about topic number {i}." for i in range(40)]
FAST = {
    "reward": {"backbone": "@champion", "epochs": 2, "batch_size": 4, "max_length": 64, "lr": 1e-3},
    "ppo": {"iterations": 2, "prompts_per_iteration": 4, "samples_per_prompt": 2, "max_new_tokens": 8,
            "max_model_len": 256, "policy_lr": 1e-4, "checkpoint_every": 0},
    "evaluate": {"max_prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 8, "min_win_rate": 0.0,
                 "min_reward_gain": -1000.0, "max_kl": -1},
    "min_pairs": 4,
    # The tiny RM on a few dozen pairs is near chance; this test is about the run, not the RM's quality.
    "reward_min_accuracy": 0.0,
    "serving_timeout_s": 120,
}


@pytest.fixture(scope="module")
def loop_stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("pipeline-home")
    prompt_file = home / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    stack = start_stack(home, ALIGNLOOP_PIPELINE_DEFAULTS=json.dumps({**FAST, "prompt_file": str(prompt_file)}),
                        ALIGNLOOP_POLICY_POLL_S="1", ALIGNLOOP_REWARD_POLL_S="1")
    # Users' traffic and preferences first, so each test's run has pairs to train on whatever runs first.
    _give_feedback(stack)
    yield stack
    stack.stop()


def _headers(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _give_feedback(stack, rounds: int = 8) -> None:
    """Users' traffic: two answers per prompt and a comparison preferring the longer one."""
    app = _headers(stack.credentials["app_key"])
    with httpx.Client(base_url=stack.gateway, headers=app, timeout=60) as client:
        for i in range(rounds):
            resp = client.post("/v1/chat/completions", json={
                "model": "alignloop-policy", "n": 2, "max_tokens": 8, "seed": i,
                "messages": [{"role": "user", "content": PROMPTS[i]}]})
            assert resp.status_code == 200, resp.text
            choices = resp.json()["choices"]
            ids = [c["completion_id"] for c in choices]
            longer = max(choices, key=lambda c: len(c["message"]["content"]))["completion_id"]
            fb = client.post("/v1/feedback", json={"kind": "comparison", "completion_ids": ids, "preferred": longer})
            assert fb.status_code == 200, fb.text


def _wait(stack, run_id: str, timeout: float = 900) -> dict:
    op = _headers(stack.credentials["operator_key"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{stack.gateway}/v1/admin/pipelines/runs/{run_id}", headers=op, timeout=30).json()
        if run["status"] not in ("queued", "running"):
            return run
        time.sleep(2)
    pytest.fail(f"run {run_id} still {run['status']} after {timeout} s: {json.dumps(run)[:3000]}")


def _champions(stack) -> tuple[str, str]:
    client = MlflowClient(tracking_uri=stack.mlflow, registry_uri=stack.mlflow)
    return (client.get_model_version_by_alias("alignloop-policy", "champion").version,
            client.get_model_version_by_alias("alignloop-reward", "champion").version)


def test_operator_routes_refuse_app_keys(loop_stack):
    app = _headers(loop_stack.credentials["app_key"])
    assert httpx.post(f"{loop_stack.gateway}/v1/admin/pipelines/runs", headers=app, json={}).status_code == 403
    assert httpx.get(f"{loop_stack.gateway}/v1/admin/pipelines/runs", headers=app).status_code == 403
    assert httpx.post(f"{loop_stack.gateway}/v1/admin/pipelines/runs").status_code == 401


def test_a_failing_step_leaves_every_champion_untouched(loop_stack):
    before = _champions(loop_stack)
    op = _headers(loop_stack.credentials["operator_key"])
    # The RM trains and passes its gate; PPO then refuses its configuration: nothing may be promoted.
    resp = httpx.post(f"{loop_stack.gateway}/v1/admin/pipelines/runs", headers=op, timeout=30,
                      json={"reason": "test: PPO fails", "config": {"ppo": {"clip_range": 5.0}}})
    assert resp.status_code == 202, resp.text
    run = _wait(loop_stack, resp.json()["id"])
    assert run["status"] == "failed", run
    steps = {s["name"]: s for s in run["steps"]}
    assert steps["reward_train"]["status"] == "succeeded"
    assert steps["ppo"]["status"] == "failed" and "clip_range" in steps["ppo"]["detail"]
    assert steps["promote"]["status"] == "skipped"
    assert _champions(loop_stack) == before


def test_the_loop_promotes_a_new_policy_that_serving_then_answers_with(loop_stack):
    op = _headers(loop_stack.credentials["operator_key"])
    policy_before, reward_before = _champions(loop_stack)
    resp = httpx.post(f"{loop_stack.gateway}/v1/admin/pipelines/runs", headers=op, timeout=30,
                      json={"reason": "test: whole loop"})
    assert resp.status_code == 202, resp.text
    run_id = resp.json()["id"]
    # One run at a time: a second trigger is refused, naming the first.
    second = httpx.post(f"{loop_stack.gateway}/v1/admin/pipelines/runs", headers=op, timeout=30, json={})
    assert second.status_code == 409 and run_id in second.text

    run = _wait(loop_stack, run_id)
    assert run["status"] == "succeeded", json.dumps(run)[:4000]
    steps = {s["name"]: s for s in run["steps"]}
    assert [s["name"] for s in run["steps"]] == ["snapshot", "reward_train", "reward_gate", "ppo", "policy_gate",
                                                  "promote", "serving"]
    assert all(s["status"] == "succeeded" for s in run["steps"]), steps
    policy_after, reward_after = _champions(loop_stack)
    assert int(policy_after) > int(policy_before) and int(reward_after) > int(reward_before)
    assert run["promoted_policy_version"] == policy_after and run["promoted_reward_version"] == reward_after

    # Serving answers with the promoted version.
    app = _headers(loop_stack.credentials["app_key"])
    models = httpx.get(f"{loop_stack.gateway}/v1/models", headers=app, timeout=30).json()
    assert models["data"][0]["version"] == policy_after

    # MLflow: one parent run, a child per step that ran, each with its log.
    client = MlflowClient(tracking_uri=loop_stack.mlflow)
    parent = client.get_run(run["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["alignloop.step"] for c in children} == set(steps)
    ppo_child = next(c for c in children if c.data.tags["alignloop.step"] == "ppo")
    assert any(a.path == "ppo.log" for a in client.list_artifacts(ppo_child.info.run_id))

    listed = httpx.get(f"{loop_stack.gateway}/v1/admin/pipelines/runs", headers=op, timeout=30).json()["data"]
    assert listed[0]["id"] == run_id  # newest first
    created = [r["created_at"] for r in listed]
    assert created == sorted(created, reverse=True)
