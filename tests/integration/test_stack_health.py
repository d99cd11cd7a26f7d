"""grpc.health.v1 on the real stack's services, and the container probe (docker/probe.py) that asks it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alignloop.grpc_health import LIVENESS, SERVING, check
from tests.conftest import REPO, Stack, free_port

pytestmark = pytest.mark.integration

# component -> (its port's variable, the service it publishes)
GRPC_COMPONENTS = {
    "policy": ("ALIGNLOOP_POLICY_PORT", "alignloop.v1.PolicyService"),
    "policy-canary": ("ALIGNLOOP_POLICY_CANARY_PORT", "alignloop.v1.PolicyService"),
    "reward": ("ALIGNLOOP_REWARD_PORT", "alignloop.v1.RewardService"),
    "feedback": ("ALIGNLOOP_FEEDBACK_PORT", "alignloop.v1.FeedbackService"),
    "pipeline": ("ALIGNLOOP_PIPELINE_PORT", "alignloop.v1.PipelineService"),
}


@pytest.mark.parametrize("component", GRPC_COMPONENTS)
def test_each_grpc_service_reports_ready_and_alive(stack: Stack, component: str) -> None:
    port_variable, service = GRPC_COMPONENTS[component]
    target = f"127.0.0.1:{stack.env[port_variable]}"
    # The canary is ready while it waits for a challenger: the gateway falls back to the champion meanwhile.
    assert [check(target, name) for name in ("", service, LIVENESS)] == [SERVING] * 3
    assert check(target, "alignloop.v1.NoSuchService") is None  # NOT_FOUND


def probe(stack: Stack, name: str, **env: str) -> int:
    return subprocess.run([sys.executable, str(REPO / "docker" / "probe.py"), name], env={**stack.env, **env},
                          cwd=REPO, timeout=60).returncode


@pytest.mark.parametrize("name", ["gateway", "policy", "reward", "feedback", "materializer", "pipeline"])
def test_the_container_probe_passes_on_a_ready_service(stack: Stack, name: str) -> None:
    assert probe(stack, name) == 0


def test_the_container_probe_fails_where_nothing_answers(stack: Stack) -> None:
    # In its own container the canary's port is ALIGNLOOP_POLICY_PORT: ready here, nothing on a free port.
    assert probe(stack, "policy-canary", ALIGNLOOP_POLICY_PORT=stack.env["ALIGNLOOP_POLICY_CANARY_PORT"]) == 0
    assert probe(stack, "policy-canary", ALIGNLOOP_POLICY_PORT=str(free_port())) == 1
    assert probe(stack, "reward", ALIGNLOOP_REWARD_PORT=str(free_port())) == 1
