"""Where a step's processes run. `LocalLauncher` starts them on this machine; a cluster engine (a Kubernetes
Job, a Ray task) plugs in as another class with the same `launch` and `Handle` shape: the runner only asks
whether a step is still running, for its exit status and log, and to kill it."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from alignloop.supervisor import stop_groups


class Handle(Protocol):
    pid: int

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...


@dataclass
class LocalHandle:
    process: subprocess.Popen
    log_file: object

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        code = self.process.poll()
        if code is not None:
            self.log_file.close()
        return code

    def kill(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the step's whole process group (torchrun's workers and vLLM's included), SIGKILL to what
        is left after `grace_s`."""
        stop_groups([self.process.pid], grace_s)
        self.process.wait()
        self.log_file.close()


# Either one sets how long GNU OpenMP's idle threads spin; a caller that set one has chosen.
OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


class LocalLauncher:
    """Each step is a child process in a session of its own, its stdout and stderr appended to its log.

    The steps share this machine with the serving engine: `omp_wait_policy` (Settings.job_omp_wait_policy)
    becomes their OMP_WAIT_POLICY unless `env` sets a wait policy already; empty leaves the runtime's.
    """

    def __init__(self, omp_wait_policy: str = "") -> None:
        self.omp_wait_policy = omp_wait_policy

    def launch(self, argv: list[str], *, env: dict[str, str], log_path: Path, cwd: Path) -> LocalHandle:
        if self.omp_wait_policy and not any(k in env for k in OPENMP_WAIT_VARIABLES):
            env = {**env, "OMP_WAIT_POLICY": self.omp_wait_policy}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")  # noqa: SIM115 - closed by the handle when the process ends
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=cwd, start_new_session=True)
        return LocalHandle(process, log)


def last_json_line(log_path: Path, max_bytes: int = 1 << 20) -> dict | None:
    """The step command's summary: the last line of its log that is a JSON object."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def tail(log_path: Path, lines: int = 5) -> str:
    """Why a step failed, in one line: the command's own error line (the CLI prints "✗ reason"; torchrun's
    summary would otherwise bury it), else the last few lines of the log."""
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line.strip() for line in text if line.lstrip().startswith("✗")]
    if errors:
        return errors[-1][:600]
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())[-600:]
