"""Real component processes for test stacks that need to start, kill -9 and restart them one at a time (the
supervisor stops everything when one exits, by design). Each is started as `alignloop up` would: the
component's argv and environment from alignloop/components.py, the settings as ALIGNLOOP_* variables."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from alignloop import components
from alignloop.components import http_ok
from alignloop.config import Settings
from tests.conftest import REPO, Stack, free_port, free_ports, wait_for


@dataclass
class ComponentProcesses:
    settings: Settings
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def component(self, name: str) -> components.Component:
        """The component called `name` (subclasses list theirs)."""
        raise NotImplementedError

    def probe(self, name: str, component: components.Component) -> Callable[[], bool]:
        return component.probe

    def start(self, name: str, timeout: float = 60) -> None:
        """Starts `name` in its own process group and waits until its probe says it is ready."""
        c = self.component(name)
        # Only this stack's settings: ALIGNLOOP_* variables of the test runner and any alignloop.toml stay out.
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("ALIGNLOOP_")},
               **self.settings.to_env(), **c.env, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "ALIGNLOOP_CONFIG": str(self.settings.home / "no-such-config.toml")}
        with open(self.settings.logs_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(c.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                                start_new_session=True)
        ready = self.probe(name, c)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode}:\n{self.log(name)}")
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready after {timeout} s:\n{self.log(name)}")

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 30) -> int:
        """Sends `sig` to the process group (SIGKILL after `timeout` if it is still there); its exit code."""
        p = self.procs.pop(name)
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            return p.wait(10)

    def log(self, name: str) -> str:
        path = self.settings.logs_dir / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def down(self) -> None:
        for name in reversed(list(self.procs)):
            self.kill(name, signal.SIGTERM)


@contextlib.contextmanager
def gateway_replica(stack: Stack, log_dir: Path, **env: str) -> Iterator[str]:
    """One more gateway process on a port of its own, in front of the stack's services; its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_dir / f"gateway-{port}.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.gateway"], cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT,
                                   env={**stack.env, "ALIGNLOOP_GATEWAY_PORT": str(port), **env})
    try:
        wait_for(lambda: process.poll() is None and http_ok(f"{url}/readyz"), timeout=90,
                 what=f"a gateway replica on port {port} (log: {log_dir})")
        yield url
    finally:
        process.terminate()
        process.wait(30)


@contextlib.contextmanager
def policy_replica(stack: Stack, log_dir: Path, **env: str) -> Iterator[tuple[int, int]]:
    """One more policy service (the stack's champion, on a vLLM engine of its own), with `env` on top of the
    stack's settings; its gRPC and metrics ports once it is serving."""
    port, metrics_port = free_ports(2)
    log_path = log_dir / f"policy-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.policy"], cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT,
                                   env={**stack.env, "ALIGNLOOP_POLICY_PORT": str(port),
                                        "ALIGNLOOP_POLICY_METRICS_PORT": str(metrics_port), **env})
    try:
        def serving() -> bool:
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            return components.grpc_serving(f"127.0.0.1:{port}")

        wait_for(serving, timeout=300, what=f"a policy replica on port {port} (log: {log_path})", interval=0.5)
        yield port, metrics_port
    finally:
        process.terminate()
        process.wait(60)
