"""Promotion reaches serving: the policy service loads a newly promoted version in place while chat requests
keep coming, and none of them fails (services/policy/server.py: follow_alias)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import openai
import pytest
import torch

from alignloop.config import Settings
from alignloop.registry import fetch_version, resolve_alias
from alignloop.v1 import policy_pb2 as pb
from alignloop.v1 import policy_pb2_grpc as pb_grpc
from pipelines import promotion
from pipelines.models_init import register_folder
from tests.conftest import start_stack


@pytest.fixture(scope="module")
def swap_stack(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("swap-home"), ALIGNLOOP_POLICY_POLL_S="0.5")
    yield stack
    stack.stop()


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


def test_promotion_is_served_in_place_without_failing_a_request(swap_stack, tmp_path):
    settings = settings_of(swap_stack)
    folder = perturbed_copy(settings, tmp_path / "v2")
    v2 = register_folder(settings, settings.policy_model_name, folder, aliases=(), description="test",
                         tags={"kind": "test"}, run_name="swap-test")

    client = openai.OpenAI(base_url=f"{swap_stack.gateway}/v1", api_key=swap_stack.credentials["app_key"],
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
    assert "1" in versions and v2.version in versions, set(versions)
    # One switch, no flapping: after the first answer of the new version, only answers already under way at
    # the switch (at most one per client thread) can still come from the old one.
    first_new = versions.index(v2.version)
    assert versions[first_new:].count("1") <= len(workers)
    with grpc.insecure_channel(swap_stack.policy) as channel:
        info = pb_grpc.PolicyServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.model.version == v2.version and info.swaps == 1

    # Rollback is followed the same way.
    promotion.rollback(settings, settings.policy_model_name)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        resp = client.chat.completions.create(model="alignloop-policy", messages=[{"role": "user", "content": "x"}],
                                              max_tokens=4)
        if resp.system_fingerprint.endswith("/v1"):
            break
        time.sleep(0.3)
    assert resp.system_fingerprint.endswith("/v1")


def test_canary_splits_traffic_attributes_feedback_and_graduates(swap_stack):
    """An operator gives a challenger half the traffic; both versions answer, feedback lands on the version
    that answered, /v1/admin/models/versions shows them side by side; promoting the challenger ends the canary."""
    import httpx

    settings = settings_of(swap_stack)
    creds = swap_stack.credentials
    ops = httpx.Client(base_url=swap_stack.gateway, headers={"Authorization": f"Bearer {creds['operator_key']}"},
                       timeout=60)
    app = httpx.Client(base_url=swap_stack.gateway, headers={"Authorization": f"Bearer {creds['app_key']}"},
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
        with grpc.insecure_channel(swap_stack.policy_canary) as channel:
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
