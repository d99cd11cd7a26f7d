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
