"""Runs the local stack's processes: start in order, wait for readiness, watch, stop cleanly.

Each component runs in its own process group (vLLM forks engine processes; a group signal reaches them all)
and receives SIGTERM if the supervisor itself dies. Nothing is ever restarted: a component that exits makes
the supervisor say which one and where its log is, stop the rest, and exit non-zero.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from rich.console import Console
from rich.markup import escape

from alignloop.components import Component
from alignloop.config import Settings
from alignloop.console_progress import stamped

STATE_FILE = "stack.json"
# Off a terminal (a log file, CI, `docker logs`) the start's spinner prints nothing: a plain line this often
# says what is still starting and what its log said last, so two minutes of compiling are not two silent ones.
WAITING_LINE_EVERY_S = 30.0


class StackError(RuntimeError):
    """A component could not be started; the message names it and its log."""


# If the supervisor is killed outright, its children get SIGTERM instead of living on (PR_SET_PDEATHSIG).
# util-linux's setpriv sets it and execs the component: nothing runs between fork and exec in our process. (A
# preexec_fn did, and a child forked while another thread of the supervisor held the dynamic loader's lock
# hung before exec, and the supervisor with it, waiting for that exec.)
_SETPRIV = shutil.which("setpriv")
_PRCTL = None if _SETPRIV else ctypes.CDLL(None, use_errno=True).prctl  # resolved now, not in the child


def _die_with_parent() -> None:
    _PRCTL(1, signal.SIGTERM)


def with_parent_death_signal(argv: list[str]) -> tuple[list[str], object]:
    """argv and preexec_fn for a child that gets SIGTERM when its parent (the thread that starts it) dies."""
    if _SETPRIV:
        return [_SETPRIV, "--pdeathsig", "TERM", "--", *argv], None
    return argv, _die_with_parent


def port_in_use(host: str, port: int) -> bool:
    """True when something listens on the port (TIME_WAIT leftovers of closed connections do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports nothing listens on now. Every probe socket stays bound until all are picked: probing
    one at a time, the OS may hand the same port out twice (a test stack once got MLflow's port for its gateway)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(n)]
        for probe in probes:
            probe.bind((host, 0))
        return [probe.getsockname()[1] for probe in probes]


def pid_alive(pid: int) -> bool:
    """True while `pid` runs. A zombie (exited, not yet reaped by its parent) counts as gone: `alignloop down`
    would otherwise wait out its whole timeout on a supervisor whose parent has not called wait() yet."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


@dataclass
class Running:
    component: Component
    process: subprocess.Popen
    log_path: Path


class Supervisor:
    def __init__(self, settings: Settings, console: Console | None = None) -> None:
        self.settings = settings
        self.console = console or Console()
        self.waves: list[list[Running]] = []  # what each bring_up started, in order
        self.stopping = threading.Event()

    @property
    def running(self) -> list[Running]:
        return [r for wave in self.waves for r in wave]

    # ---- starting ----------------------------------------------------------------------------------------
    def check_ports(self, components: list[Component]) -> None:
        for c in components:
            ports = [(c.port, "PORT")] + ([(c.metrics_port, "METRICS_PORT")] if c.metrics_port else [])
            for port, var in ports:
                if port_in_use(self.settings.host, port):
                    raise StackError(
                        f"{c.name}: port {self.settings.host}:{port} is already in use. Stop what holds it, "
                        f"or choose another port (ALIGNLOOP_{c.name.upper().replace('-', '_')}_{var})."
                    )

    def start(self, component: Component) -> Running:
        log_path = self.settings.logs_dir / f"{component.name}.log"
        env = {**os.environ, **self.settings.to_env(), **component.env, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as log:
            log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {component.name} =====\n".encode())
            log.flush()
            argv, preexec = with_parent_death_signal(component.argv)
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, preexec_fn=preexec,  # noqa: PLW1509 (only without setpriv)
            )
        return Running(component, process, log_path)

    def _check(self, running: Running, since: float | None) -> bool:
        """True once `running` answers its probe; raises if it exited, or if start_timeout_s passed `since`
        (None: its clock has not started)."""
        c = running.component
        if running.process.poll() is not None:
            raise StackError(
                f"{c.name} exited with code {running.process.returncode} while starting; "
                f"see its log: {running.log_path}\n{tail(running.log_path)}"
            )
        if c.probe():
            return True
        if since is not None and time.monotonic() > since + c.start_timeout_s:
            raise StackError(
                f"{c.name} was not ready after {c.start_timeout_s:.0f} s; see its log: {running.log_path}\n"
                f"{tail(running.log_path)}"
            )
        return False

    def bring_up(self, components: list[Component]) -> None:
        """Starts `components` together and waits until each is ready.

        They depend only on what earlier calls brought up, or wait by themselves for what they name in
        `needs`, so none has to wait for another's start to begin its own: the cheap starts overlap the
        policy's engine start instead of queueing behind it."""
        started = time.monotonic()
        wave: list[Running] = []
        self.waves.append(wave)  # before any start: whatever did start is stopped if a later one fails
        for c in components:
            wave.append(self.start(c))
            self._write_state()
        waiting = list(wave)
        ready_at: dict[str, float] = {}
        last_line = started
        with self.console.status("starting") as status:
            while waiting:
                if self.stopping.is_set():
                    raise StackError("interrupted while starting")
                names = {r.component.name for r in waiting}
                for running in list(waiting):
                    c = running.component
                    # A component's clock starts when the last of its needs is ready (needs from earlier waves
                    # were ready before this one started).
                    since = None if names & set(c.needs) else max(
                        (ready_at.get(n, started) for n in c.needs), default=started)
                    if self._check(running, since):
                        ready_at[c.name] = time.monotonic()
                        self.console.print(f"[green]✓[/] {c.name:<8} {c.url}  ({ready_at[c.name] - started:.0f} s)")
                        waiting.remove(running)
                if not waiting:
                    break
                # The log is read only when its line will be shown: off a terminal the spinner draws nothing.
                now = time.monotonic()
                if self.console.is_terminal:
                    note = self._waiting_note(waiting, now - started)
                    status.update(escape(f"{note} (logs: {self.settings.logs_dir})"))
                elif now - last_line >= WAITING_LINE_EVERY_S:
                    note = self._waiting_note(waiting, now - started)
                    self.console.print(escape(stamped(note)), highlight=False)
                    last_line = now
                time.sleep(0.25)

    @staticmethod
    def _waiting_note(waiting: list[Running], elapsed_s: float) -> str:
        """'starting policy, gateway (62 s); policy: Warming up model for the compilation...': the log line is
        the first waiting component's whose own start is under way, not one still waiting for a need."""
        names = {r.component.name for r in waiting}
        busy = next((r for r in waiting if not names & set(r.component.needs)), waiting[0])
        note = f"starting {', '.join(r.component.name for r in waiting)} ({elapsed_s:.0f} s)"
        doing = latest_line(busy.log_path)
        return f"{note}; {busy.component.name}: {doing}" if doing else note

    # ---- running -----------------------------------------------------------------------------------------
    def watch(self) -> int:
        """Blocks until a stop is asked for (0) or a component exits on its own (1)."""
        while not self.stopping.wait(0.5):
            for r in self.running:
                if r.process.poll() is not None:
                    self.console.print(
                        f"[red]✗ {r.component.name} exited unexpectedly (code {r.process.returncode}); "
                        f"see its log: {r.log_path}[/]\n{tail(r.log_path)}\n"
                        "Stopping the stack: alignloop restarts nothing on its own."
                    )
                    return 1
        return 0

    # ---- stopping ----------------------------------------------------------------------------------------
    def stop_all(self, timeout_s: float = 20.0) -> None:
        """Stops what was started, last wave first; within a wave, what `needs` others (the gateway) before the
        rest. Each step's processes are stopped together (`stop_groups`): one after another, the policy
        services' engine shutdowns added up."""
        for wave in reversed(self.waves):
            dependents = [r for r in wave if r.component.needs]
            for step in (dependents, [r for r in wave if not r.component.needs]):
                names = {r.process.pid: r.component.name for r in step}

                def stopped(pid: int, killed: bool, names=names) -> None:
                    note = f" (killed: still running after {timeout_s:.0f} s)" if killed else ""
                    self.console.print(f"[dim]stopped {names[pid]}{note}[/]")

                stop_groups(list(names), timeout_s, on_stopped=stopped)
                for r in step:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        r.process.wait(5)  # reap
        self.waves.clear()
        self.state_path.unlink(missing_ok=True)

    # ---- state shared with `alignloop status` / `alignloop down` -----------------------------------------
    @property
    def state_path(self) -> Path:
        return self.settings.run_dir / STATE_FILE

    def _write_state(self) -> None:
        state = {
            "supervisor_pid": os.getpid(),
            "home": str(self.settings.home),
            "components": [
                {"name": r.component.name, "pid": r.process.pid, "url": r.component.url, "log": str(r.log_path)}
                for r in self.running
            ],
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)


def stop_groups(pgids: list[int], timeout_s: float,
                on_stopped: Callable[[int, bool], None] | None = None) -> None:
    """Terminates process groups together: SIGTERM to each, then SIGKILL to those still running after
    `timeout_s`. `on_stopped(pgid, killed)` is called as each one ends. Reaping is the caller's: an ended child
    left unreaped does not hold this up (see `group_alive`)."""
    on_stopped = on_stopped or (lambda _pgid, _killed: None)
    pending = []
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        pending.append(pgid)
    deadline = time.monotonic() + timeout_s
    while pending:
        for pgid in [p for p in pending if not group_alive(p)]:
            pending.remove(pgid)
            on_stopped(pgid, False)
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pgid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        on_stopped(pgid, True)


def group_alive(pgid: int) -> bool:
    """True while a process of group `pgid` still runs. As in `pid_alive`, zombies (ended, not yet reaped by
    their parent) count as gone: a stopped child would otherwise look alive until its parent's wait()."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if pid_alive(pgid):  # the leader: nearly always the last to go
        return True
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
    return False


def read_state(settings: Settings) -> dict | None:
    path = settings.run_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return ""
    return "\n".join("    " + line for line in text)


# What a log line starts with before its message: vLLM's process tag and its
# 'INFO 12-07 21:13:23 [file.py:87]', Python logging's '2026-12-07 21:12:36,509 INFO name:', and torch's
# 'W1207 21:12:59.513000 19334 file.py:53]' (with or without a pid and brackets).
_LOG_PREFIX = re.compile(
    r"^(?:\([^()]*pid=\d+\)\s+)?"
    r"(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d \[[^\]]*\]\s*"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+:\s*"
    r"|\[?[DIWEF]\d{4} \d\d:\d\d:\d\d\.\d+(?: +\d+)? [^\]]*\]\s*)?"
)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def latest_line(path: Path, limit: int = 100) -> str:
    """The last line written to the log at `path` (a progress bar's last redraw counts as a line), without
    its logger's prefix and cut to `limit` characters; '' when there is none yet."""
    try:
        with open(path, "rb") as log:
            log.seek(max(log.seek(0, os.SEEK_END) - 8192, 0))
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    lines = [line.strip() for line in re.split(r"[\r\n]+", _ANSI.sub("", text)) if line.strip()]
    if not lines:
        return ""
    line = _LOG_PREFIX.sub("", lines[-1]) or lines[-1]
    return line if len(line) <= limit else line[:limit - 1] + "…"
