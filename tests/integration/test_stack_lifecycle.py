"""`alignloop up / status / down`: readiness, credentials, refusals, and a shutdown that leaves nothing behind."""

from __future__ import annotations

import json
import signal
import socket
import stat
import subprocess
import time

import psutil
import pytest

from alignloop.supervisor import port_in_use

from tests.conftest import ALIGNLOOP, REPO, stack_env, start_stack, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Its own ALIGNLOOP_HOME: the session's chat stack may still be running on the shared one."""
    return tmp_path_factory.mktemp("lifecycle-home")


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def test_up_status_then_down_leaves_no_process_behind(home):
    # One stack for the whole lifecycle: each start costs a vLLM engine (half a minute on two cores). `down`
    # stops it the way Ctrl-C or a SIGTERM would: it signals the supervisor, which stops every component.
    # vLLM's statistics every second: the task that logs them must have used the engine before the stack stops.
    stack = start_stack(home, VLLM_LOG_STATS_INTERVAL="1")
    processes: list[psutil.Process] = []
    try:
        creds_path = home / "credentials.json"
        assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600
        creds = json.loads(creds_path.read_text())
        assert set(creds) == {"app_key", "operator_key"} and creds["app_key"] != creds["operator_key"]

        out = stack.log()
        for name in ("kafka", "mlflow", "reward", "policy", "gateway"):
            assert f"✓ {name}" in out
            assert (home / "logs" / f"{name}.log").exists()
        assert str(creds_path) in out

        status = subprocess.run([ALIGNLOOP, "status"], env=stack.env, capture_output=True, text=True, cwd=REPO)
        assert status.returncode == 0, status.stdout + status.stderr
        for name in ("kafka", "mlflow", "reward", "policy", "gateway"):
            assert name in status.stdout

        # A second `up` on the same home refuses instead of fighting over ports.
        second = subprocess.run([ALIGNLOOP, "up"], env=stack.env, capture_output=True, text=True, cwd=REPO,
                                timeout=60)
        assert second.returncode == 1 and "already running" in second.stdout

        # One answer served, and vLLM's statistics logged after it: the stack stops having done real work.
        from openai import OpenAI

        client = OpenAI(base_url=f"{stack.gateway}/v1", api_key=creds["app_key"], max_retries=0)
        answer = client.chat.completions.create(model="alignloop-policy", max_tokens=4,
                                                messages=[{"role": "user", "content": "hello"}])
        assert answer.usage.completion_tokens > 0
        wait_for(lambda: "Avg generation throughput" in (home / "logs" / "policy.log").read_text(), 30,
                 "the policy service to log vLLM's statistics")
        processes = _descendants(stack.process.pid)
        # broker, MLflow (+ its uvicorn worker), policy (+ vLLM engine core), gateway at the least
        assert len(processes) >= 4

        down = subprocess.run([ALIGNLOOP, "down"], env=stack.env, capture_output=True, text=True, cwd=REPO,
                              timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        # The supervisor itself stopped everything, cleanly (down only sweeps up what a dead one left).
        assert stack.process.wait(30) == 0, stack.log()
    finally:
        if stack.process.poll() is None:
            stack.stop()
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert alive == [], f"left behind: {[(p.pid, p.name()) for p in alive]}"
    assert "stopped kafka" in stack.log()
    assert not (home / "run" / "stack.json").exists()
    # Every component stopped without an error; the policy service shut its engine down itself, not vLLM's
    # finaliser at interpreter exit.
    logs = sorted((home / "logs").glob("*.log"))
    assert {"policy.log", "gateway.log", "reward.log"} <= {log.name for log in logs}
    for log in logs:
        text = log.read_text()
        assert "Exception ignored" not in text and "Traceback" not in text, f"{log.name}: {text[-3000:]}"
    status = subprocess.run([ALIGNLOOP, "status"], env=stack.env, capture_output=True, text=True, cwd=REPO)
    assert status.returncode == 3 and "not running" in status.stdout

    # Stopping leaves the credentials as they were (test_credentials_created_0600_then_reused: later starts
    # reuse them).
    assert json.loads((home / "credentials.json").read_text()) == creds


def test_up_refuses_a_taken_port_naming_the_component(tmp_path):
    env = stack_env(tmp_path / "home")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["ALIGNLOOP_GATEWAY_PORT"])))
        taken.listen()
        started = time.monotonic()
        result = subprocess.run([ALIGNLOOP, "up"], env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1
    assert "gateway" in result.stdout and env["ALIGNLOOP_GATEWAY_PORT"] in result.stdout
    assert "already in use" in result.stdout
    # Refused before anything was started.
    assert time.monotonic() - started < 30
    assert not (tmp_path / "home" / "logs" / "kafka.log").exists()


def test_up_refuses_a_taken_metrics_port_naming_its_variable(tmp_path):
    env = stack_env(tmp_path / "home")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["ALIGNLOOP_REWARD_METRICS_PORT"])))
        taken.listen()
        result = subprocess.run([ALIGNLOOP, "up"], env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1
    assert "ALIGNLOOP_REWARD_METRICS_PORT" in result.stdout and "already in use" in result.stdout


def test_a_component_that_fails_to_start_is_named_with_its_log(home):
    # An alias nobody set: the policy service cannot find its model and exits.
    env = stack_env(home, ALIGNLOOP_POLICY_MODEL_ALIAS="no-such-alias")
    process = subprocess.Popen([ALIGNLOOP, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=REPO)
    try:
        out, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    assert process.returncode == 1
    assert "policy exited with code" in out
    assert str(home / "logs" / "policy.log") in out
    assert "stopped mlflow" in out and "stopped kafka" in out
    assert "no-such-alias" in (home / "logs" / "policy.log").read_text()


def test_models_init_is_idempotent(home):
    env = stack_env(home)
    result = subprocess.run([ALIGNLOOP, "models", "init", "--tiny"], env=env, capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "version 1 is @champion and @reference" in result.stdout
    # It started the tracking server for itself and stopped it again.
    assert "stopped mlflow" in result.stdout
    assert not port_in_use("127.0.0.1", int(env["ALIGNLOOP_MLFLOW_PORT"]))
