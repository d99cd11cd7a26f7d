"""Shared fixtures. Integration tests run a real stack (`alignloop up`) on free ports with a tiny model."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from alignloop.config import Settings

REPO = Path(__file__).resolve().parents[1]
ALIGNLOOP = str(Path(sys.executable).parent / "alignloop")

# Idle OpenMP threads sleep at once in every process of the suite (torch's trainers here, the stacks' services
# and benchmarks; vLLM's engines already do: alignloop.config.vllm_serving_environment), unless the caller set
# a policy. By default they spin up to ~3 ms between kernels, holding a core: with two workers on two cores
# two PPO runs side by side took 287 s each instead of 71 s (one alone: 49 s, 57 s passive). Set before any
# test imports torch, and inherited by the pytest-xdist workers and everything they start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Small enough that "longer than the context" is easy to reach in a test.
TEST_MAX_MODEL_LEN = 256
TEST_MAX_N = 4


# Test stacks take their ports from below Linux's ephemeral range (32768 and up), where no outgoing connection
# can take one between its pick and its server's bind, and each pytest-xdist worker from its own slice of that,
# so two workers running side by side never pick the same port.
_PORTS_LOW, _PORTS_HIGH = 10_000, 32_768
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
_SLICE = (_PORTS_HIGH - _PORTS_LOW) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_next_port = _PORTS_LOW + _WORKER * _SLICE + (os.getpid() % _SLICE)  # a fresh start each run: no TIME_WAIT


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports of this worker's slice that nothing is bound to now, taken in turn (a port is not
    handed out again until the slice wraps around)."""
    global _next_port
    start = _PORTS_LOW + _WORKER * _SLICE
    ports: list[int] = []
    for _ in range(_SLICE):
        port, _next_port = _next_port, start + (_next_port + 1 - start) % _SLICE
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:  # something of the machine's own (RabbitMQ's 15672, ...) or a port still closing
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free ports in {start}..{start + _SLICE - 1}")


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """Each test leaves os.environ as it found it. An engine run in the test's own process (PPO's rollouts)
    sets vLLM's variables there, pointing into that test's folder; the processes later tests start must not
    inherit them (a socket folder deep in an earlier test's tree once broke a later test's engine)."""
    saved = dict(os.environ)
    yield
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    os.environ.update(saved)


@pytest.fixture
def progress_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[dict]]:
    """ALIGNLOOP_PROGRESS_FILE set for this test: the file, and each report written to it, in order (the file
    itself keeps only the last, as the pipeline runner reads it)."""
    from alignloop import progress

    path = tmp_path / "step.progress.json"
    monkeypatch.setenv(progress.ENV, str(path))
    seen: list[dict] = []
    real = progress.report

    def recording(done: int, total: int, **extra) -> None:
        real(done, total, **extra)
        seen.append(json.loads(path.read_text()))

    monkeypatch.setattr(progress, "report", recording)
    return path, seen


def free_port() -> int:
    return free_ports(1)[0]


def wait_for(predicate, timeout: float = 10.0, what: str = "the condition", interval: float = 0.05) -> None:
    """Polls `predicate` until it is true; fails the test after `timeout` seconds, naming `what`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def wait_until_taken(key: str, *urls: str) -> None:
    """Waits until every gateway at `urls` accepts `key` (a gateway re-reads the credentials file within a
    second of a change)."""
    import httpx

    for url in urls:
        wait_for(lambda: httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
                 == 200, timeout=10, what=f"{url} to take the new key")


def stack_env(home: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNLOOP_")}
    port_names = [name for name in Settings.model_fields if name.endswith("_port")]
    env.update({f"ALIGNLOOP_{name.upper()}": str(port) for name, port in zip(port_names, free_ports(len(port_names)))})
    env.update(
        ALIGNLOOP_HOME=str(home),
        ALIGNLOOP_BOOTSTRAP_MODEL="tiny",
        ALIGNLOOP_KAFKA_SESSION_TIMEOUT_MS="6000",
        ALIGNLOOP_ENFORCE_EAGER="true",
        ALIGNLOOP_MAX_MODEL_LEN=str(TEST_MAX_MODEL_LEN),
        ALIGNLOOP_MAX_N=str(TEST_MAX_N),
        ALIGNLOOP_MAX_NUM_SEQS="16",
        # float32: the random tiny model's logits are nearly flat, and tests compare greedy and seeded answers
        # across requests (one from the prefix cache, one recomputed); bf16 rounding would flip near-ties.
        ALIGNLOOP_DTYPE="float32",
        # On a GPU, a stack's champion and canary engines, another worker's stack and a PPO rollout engine
        # (0.3) may share the device; the tiny model needs little of it (ignored on CPUs).
        ALIGNLOOP_GPU_MEMORY_UTILIZATION="0.15",
        ALIGNLOOP_CONFIG=str(home / "no-such-config.toml"),
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


@dataclass
class Stack:
    process: subprocess.Popen
    env: dict[str, str]
    home: Path
    output: Path

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.env['ALIGNLOOP_GATEWAY_PORT']}"

    @property
    def kafka(self) -> str:
        return f"127.0.0.1:{self.env['ALIGNLOOP_KAFKA_PORT']}"

    @property
    def policy(self) -> str:
        return f"127.0.0.1:{self.env['ALIGNLOOP_POLICY_PORT']}"

    @property
    def policy_canary(self) -> str:
        return f"127.0.0.1:{self.env['ALIGNLOOP_POLICY_CANARY_PORT']}"

    @property
    def mlflow(self) -> str:
        return f"http://127.0.0.1:{self.env['ALIGNLOOP_MLFLOW_PORT']}"

    @property
    def credentials(self) -> dict[str, str]:
        return json.loads((self.home / "credentials.json").read_text())

    def log(self) -> str:
        return self.output.read_text(errors="replace")

    def operator_client(self):
        """An httpx client of the stack's gateway, with the operator key."""
        import httpx

        return httpx.Client(base_url=self.gateway, timeout=30,
                            headers={"Authorization": f"Bearer {self.credentials['operator_key']}"})

    def stop(self, timeout: float = 90) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_stack(home: Path, *, timeout: float = 600, **overrides: str) -> Stack:
    """Runs `alignloop up` and returns once it reports it is up (or fails the test with its output)."""
    home.mkdir(parents=True, exist_ok=True)
    env = stack_env(home, **overrides)
    output = home / f"up-{env['ALIGNLOOP_GATEWAY_PORT']}.out"
    with open(output, "wb") as out:
        process = subprocess.Popen([ALIGNLOOP, "up"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    stack = Stack(process, env, home, output)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "alignloop is up" in stack.log():
            return stack
        if process.poll() is not None:
            pytest.fail(f"alignloop up exited with {process.returncode}:\n{stack.log()}")
        time.sleep(0.5)
    stack.stop()
    pytest.fail(f"alignloop up was not ready after {timeout} s:\n{stack.log()}")


@pytest.fixture(scope="session")
def stack_home(tmp_path_factory) -> Path:
    """One ALIGNLOOP_HOME for the session's stacks: the tiny model is registered and downloaded once."""
    return tmp_path_factory.mktemp("alignloop-home")


@pytest.fixture(scope="session")
def stack(stack_home: Path) -> Iterator[Stack]:
    s = start_stack(stack_home)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def openai_client(stack: Stack):
    from openai import OpenAI

    return OpenAI(base_url=f"{stack.gateway}/v1", api_key=stack.credentials["app_key"], max_retries=0)


# ---- feedback stacks (no vLLM) ----------------------------------------------------------------------------
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
# The machine's Redis (CI's too), for the shared rate-limit buckets: database 15, a key prefix per test.
REDIS_URL = os.environ.get("ALIGNLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one stack (dropped afterwards), so runs never see each other's rows."""
    import uuid

    import psycopg

    name = f"alignloop_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def store_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """An empty store's URL: a fresh PostgreSQL database, or a SQLite file in `tmp_path`."""
    if backend == "postgresql":
        with postgres_database() as url:
            yield url
    else:
        yield f"sqlite:///{tmp_path / 'store.db'}"


@contextlib.contextmanager
def feedback_stack(tmp_path: Path, backend: str, **overrides) -> Iterator:
    from tests.integration.feedback_stack import FeedbackStack, feedback_settings

    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database()) if backend == "postgresql" else None
        fs = FeedbackStack(feedback_settings(tmp_path, url, **overrides))
        stack.callback(fs.down)
        fs.up()
        yield fs


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fstack(request, tmp_path_factory):
    """A feedback stack per store backend, shared by a module's tests."""
    with feedback_stack(tmp_path_factory.mktemp(f"feedback-{request.param}"), request.param) as fs:
        yield fs
