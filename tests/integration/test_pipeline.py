"""The pipeline runner in a real stack (`alignloop up`, tiny models, a fast step config): users' traffic and
preferences → an operator-triggered run → RM training → PPO → gates → promotion → serving answers with it.

Then, on the same stack (one vLLM start fewer), promotion reaching serving by hand: the policy service loads a
newly promoted version in place while chat requests keep coming, and none of them fails
(services/policy/server.py: follow_alias); a canary splits traffic between champion and challenger."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import torch
from mlflow import MlflowClient

from alignloop.config import Settings
from alignloop.registry import fetch_version, resolve_alias
from alignloop.v1 import policy_pb2 as pb
from alignloop.v1 import policy_pb2_grpc as pb_grpc
from pipelines import promotion
from pipelines.models_init import register_folder
from tests.conftest import start_stack

pytestmark = pytest.mark.integration

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


# ---- promotion by hand: in-place swaps and canaries ------------------------------------------------------
def settings_of(stack) -> Settings:
    return Settings(home=stack.home, mlflow_port=int(stack.env["ALIGNLOOP_MLFLOW_PORT"]))


def perturbed_copy(settings: Settings, dest: Path) -> Path:
    """The champion's weights plus noise, saved as a plain transformers folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = resolve_alias(settings.tracking_uri, settings.policy_model_name, "champion")
    src = fetch_version(settings.tracking_uri, ref, dest.parent / "cache")
    model = AutoModelForCausalLM.from_pretrained(str(src))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(dest))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dest))
    return dest


def served_and_own_logprobs(policy_address: str, folder: Path) -> tuple[list[float], list[float]]:
    """A greedy answer's log-probs as the policy service reports them, and as `folder`'s weights give them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    messages = [{"role": "user", "content": "Say something about weights."}]
    with grpc.insecure_channel(policy_address) as channel:
        resp = pb_grpc.PolicyServiceStub(channel).Generate(pb.GenerateRequest(
            chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages]),
            sampling=pb.SamplingParams(temperature=0.0, max_tokens=8, logprobs=True)), timeout=60)
    answer = resp.completions[0]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                              add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor([prompt + list(answer.token_ids)])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].float(), -1)
    own = logprobs.gather(-1, ids[0, len(prompt):, None]).squeeze(-1).tolist()
    return [lp.logprob for lp in answer.logprobs], own


def test_promotion_is_served_in_place_without_failing_a_request(loop_stack, tmp_path):
    settings = settings_of(loop_stack)
    # Whatever the tests above promoted: the version serving now, and how many swaps brought it there.
    old = resolve_alias(settings.tracking_uri, settings.policy_model_name, "champion").version
    with grpc.insecure_channel(loop_stack.policy) as channel:
        swaps = pb_grpc.PolicyServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10).swaps
    folder = perturbed_copy(settings, tmp_path / "v2")
    v2 = register_folder(settings, settings.policy_model_name, folder, aliases=(), description="test",
                         tags={"kind": "test"}, run_name="swap-test")

    client = openai.OpenAI(base_url=f"{loop_stack.gateway}/v1", api_key=loop_stack.credentials["app_key"],
                           max_retries=0, timeout=60)
    seen: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def chat(stream: bool) -> None:
        while not stop.is_set():
            try:
                if stream:
                    chunks = list(client.chat.completions.create(
                        model="alignloop-policy", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                        stream=True))
                    seen.append(chunks[0].system_fingerprint)
                else:
                    resp = client.chat.completions.create(
                        model="alignloop-policy", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
                    assert resp.choices[0].message.content is not None
                    seen.append(resp.system_fingerprint)
            except BaseException as exc:  # noqa: BLE001 — every failure is what this test counts
                errors.append(exc)

    workers = [threading.Thread(target=chat, args=(i % 2 == 1,)) for i in range(4)]
    for w in workers:
        w.start()
    try:
        time.sleep(2)
        before = len(seen)
        promotion.promote(settings, settings.policy_model_name, v2.version, reason="test")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(s and s.endswith(f"/v{v2.version}") for s in seen):
            time.sleep(0.2)
        time.sleep(2)  # keep the load on after the swap too
    finally:
        stop.set()
        for w in workers:
            w.join(60)

    assert not errors, errors[:3]
    assert before > 0
    versions = [s.rsplit("/v", 1)[1] for s in seen]
    assert old in versions and v2.version in versions, set(versions)
    # One switch, no flapping: after the first answer of the new version, only answers already under way at
    # the switch (at most one per client thread) can still come from the old one.
    first_new = versions.index(v2.version)
    assert versions[first_new:].count(old) <= len(workers)
    with grpc.insecure_channel(loop_stack.policy) as channel:
        info = pb_grpc.PolicyServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.model.version == v2.version and info.swaps == swaps + 1
    # And it is v2 that answers, every weight of it: the served log-probs are v2's own (the tiny model's output
    # head is tied to its embeddings, which a plain reload of its folder would have left as they were).
    served, expected = served_and_own_logprobs(loop_stack.policy, folder)
    assert served == pytest.approx(expected, abs=1e-3)
    # The engine core reloaded in its own process, where alignloop.vllm_plugin drops vLLM's warning that the
    # rotary embedding (a computed table) found no weights; only what is wrong gets to the operator's log.
    assert "Failed to load weights" not in (settings.logs_dir / "policy.log").read_text()

    # Rollback is followed the same way.
    promotion.rollback(settings, settings.policy_model_name)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        resp = client.chat.completions.create(model="alignloop-policy", messages=[{"role": "user", "content": "x"}],
                                              max_tokens=4)
        if resp.system_fingerprint.endswith(f"/v{old}"):
            break
        time.sleep(0.3)
    assert resp.system_fingerprint.endswith(f"/v{old}")


def test_canary_splits_traffic_attributes_feedback_and_graduates(loop_stack):
    """An operator gives a challenger half the traffic; both versions answer, feedback lands on the version
    that answered, /v1/admin/models/versions shows them side by side; promoting the challenger ends the canary."""
    import httpx

    settings = settings_of(loop_stack)
    creds = loop_stack.credentials
    ops = httpx.Client(base_url=loop_stack.gateway, headers={"Authorization": f"Bearer {creds['operator_key']}"},
                       timeout=60)
    app = httpx.Client(base_url=loop_stack.gateway, headers={"Authorization": f"Bearer {creds['app_key']}"},
                       timeout=60)
    champion = resolve_alias(settings.tracking_uri, settings.policy_model_name, "champion").version
    challenger = next(v.version for v in promotion.versions(settings, settings.policy_model_name)[0]
                      if v.version != champion)

    assert app.put("/v1/admin/models/canary", json={"version": challenger, "percent": 50}).status_code == 403
    refused = ops.put("/v1/admin/models/canary", json={"version": champion, "percent": 50})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "version"
    set_ = ops.put("/v1/admin/models/canary", json={"version": challenger, "percent": 50, "reason": "test"})
    assert set_.status_code == 200, set_.text
    assert (set_.json()["champion"], set_.json()["challenger"], set_.json()["canary_percent"]) == (
        champion, challenger, 50)

    def ask(**extra) -> dict:
        got = app.post("/v1/chat/completions", json={"model": "alignloop-policy", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "hi"}], **extra})
        assert got.status_code == 200, got.text
        return got.json()

    # The canary service builds its engine when the challenger is named; the gateway routes once it is ready.
    deadline = time.monotonic() + 300
    info = None
    while time.monotonic() < deadline and not (info and info.ready and info.model.version == challenger
                                               and info.canary_percent == 50):
        time.sleep(1)
        with grpc.insecure_channel(loop_stack.policy_canary) as channel:
            try:
                info = pb_grpc.PolicyServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
            except grpc.RpcError:
                info = None
    assert info is not None and info.ready and info.alias == "challenger", info
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not ask()["system_fingerprint"].endswith(f"/v{challenger}"):
        time.sleep(0.5)
    answers = [ask() for _ in range(40)]
    by_version: dict[str, list[str]] = {}
    for a in answers:
        by_version.setdefault(a["system_fingerprint"].rsplit("/v", 1)[1], []).append(a["choices"][0]["completion_id"])
    assert set(by_version) == {champion, challenger}, by_version.keys()
    assert 8 <= len(by_version[challenger]) <= 32  # 50% of 40: far outside this is a broken split
    # A request naming its user always goes the same way.
    for user in ("alice", "bob", "carol"):
        assert len({ask(user=user)["system_fingerprint"] for _ in range(4)}) == 1

    # Feedback is attributed to the version that answered: thumbs up for the challenger, down for the champion.
    for version, ids in by_version.items():
        for cid in ids:
            sent = app.post("/v1/feedback", json={"kind": "thumbs", "completion_id": cid,
                                                  "value": "up" if version == challenger else "down"})
            assert sent.status_code == 200, sent.text
    deadline = time.monotonic() + 60
    while True:
        listing = ops.get("/v1/admin/models/versions", params={"days": 1}).json()
        rows = {v["version"]: v for v in listing["data"]}
        if rows[challenger]["feedback"]["total"] >= len(by_version[challenger]) and \
                rows[champion]["feedback"]["total"] >= len(by_version[champion]) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert listing["champion"] == champion
    assert listing["canary"] == {"version": challenger, "percent": 50, "serving": True}
    assert (rows[challenger]["traffic_percent"], rows[champion]["traffic_percent"]) == (50, 50)
    assert rows[challenger]["feedback"]["thumbs_up_rate"] == 1.0
    assert rows[champion]["feedback"]["thumbs_up_rate"] == 0.0
    assert rows[challenger]["feedback"]["thumbs_up"] == len(by_version[challenger])
    assert rows[challenger]["responses"] >= len(by_version[challenger])
    assert "challenger" in rows[challenger]["aliases"] and "champion" in rows[champion]["aliases"]
    assert app.get("/v1/admin/models/versions").status_code == 403

    # The challenger graduates: it becomes champion and the canary ends; the champion's service swaps to it.
    promoted = ops.post("/v1/admin/models/promote", json={"version": challenger, "reason": "canary won"})
    assert promoted.status_code == 200, promoted.text
    body = promoted.json()
    assert (body["champion"], body["challenger"], body["canary_percent"], body["previous_champion"]) == (
        challenger, None, 0, champion)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        fingerprints = {ask()["system_fingerprint"] for _ in range(6)}
        if fingerprints == {f"alignloop-policy/v{challenger}"}:
            break
        time.sleep(0.5)
    assert fingerprints == {f"alignloop-policy/v{challenger}"}
    assert ops.get("/v1/admin/models/versions").json()["canary"] == {"version": None, "percent": 0, "serving": False}
    back = ops.post("/v1/admin/models/rollback")
    assert back.status_code == 200 and back.json()["champion"] == champion
