"""The supervisor's start: components start together, each is named when it fails, `needs` delays a clock."""

from __future__ import annotations

import io
import sys
import time

import psutil
import pytest
from rich.console import Console

from alignloop.components import Component
from alignloop.config import Settings
from alignloop.supervisor import StackError, Supervisor

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def supervisor(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path))
    monkeypatch.setenv("ALIGNLOOP_CONFIG", str(tmp_path / "none.toml"))
    settings = Settings()
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(settings, Console(file=io.StringIO()))
    yield sup
    sup.stop_all(timeout_s=5)


def ready_after(seconds: float):
    """A probe that answers from `seconds` after its first call (the start of bring_up's wait)."""
    first: list[float] = []

    def probe() -> bool:
        first or first.append(time.monotonic())
        return time.monotonic() - first[0] >= seconds
    return probe


def component(name: str, probe, argv=SLEEP, **kw) -> Component:
    return Component(name=name, argv=argv, port=0, url=name, probe=probe, **kw)


def test_components_start_together(supervisor):
    # Each is ready 1.5 s after it is first asked: one after another, the last would start 3 s after the first.
    supervisor.bring_up([component(n, ready_after(1.5)) for n in ("a", "b", "c")])
    assert [r.component.name for r in supervisor.running] == ["a", "b", "c"]
    assert all(r.process.poll() is None for r in supervisor.running)
    created = [psutil.Process(r.process.pid).create_time() for r in supervisor.running]
    assert max(created) - min(created) < 1.0


def test_a_component_that_needs_another_gets_its_time_after_it(supervisor):
    # b is ready 4.5 s in; it needs a (ready at 3 s), so its 3 s clock runs from 3 s: ready in time.
    supervisor.bring_up([component("a", ready_after(3.0), start_timeout_s=10),
                         component("b", ready_after(4.5), start_timeout_s=3, needs=("a",))])


def test_without_needs_the_same_start_is_too_slow(supervisor):
    with pytest.raises(StackError, match="b was not ready after 3 s"):
        supervisor.bring_up([component("a", ready_after(3.0), start_timeout_s=10),
                             component("b", ready_after(4.5), start_timeout_s=3)])


def test_an_exit_is_named_with_its_log_even_while_waiting_for_a_need(supervisor):
    crash = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    with pytest.raises(StackError) as exc:
        supervisor.bring_up([component("a", ready_after(30), start_timeout_s=60),
                             component("b", lambda: False, argv=crash, needs=("a",))])
    message = str(exc.value)
    assert "b exited with code 3 while starting" in message
    assert "b.log" in message and "boom" in message


# A child that notes when SIGTERM arrives and when it exits, taking 1 s to shut down.
SLOW_EXIT = """
import signal, sys, time
log = open(sys.argv[1], "a")
def bye(*_):
    log.write(f"term {time.time()}\\n"); log.flush()
    time.sleep(1.0)
    log.write(f"exit {time.time()}\\n"); log.flush()
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print("up", flush=True)
while True:
    time.sleep(0.1)
"""


def events(path) -> dict[str, float]:
    return {k: float(v) for k, v in (line.split() for line in path.read_text().splitlines())}


def test_stop_all_stops_a_wave_together_and_dependents_first(supervisor, tmp_path):
    logs = {n: tmp_path / f"{n}.events" for n in ("infra", "a", "b", "front")}

    def comp(name: str, **kw) -> Component:
        return component(name, lambda: True, argv=[sys.executable, "-c", SLOW_EXIT, str(logs[name])], **kw)

    supervisor.bring_up([comp("infra")])
    supervisor.bring_up([comp("a"), comp("b"), comp("front", needs=("a",))])
    deadline = time.monotonic() + 30  # each child has installed its SIGTERM handler once it printed
    while not all((tmp_path / "logs" / f"{n}.log").read_text().count("up") for n in logs):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    supervisor.stop_all(timeout_s=10)

    infra, a, b, front = (events(logs[n]) for n in ("infra", "a", "b", "front"))
    assert front["exit"] <= min(a["term"], b["term"])  # what needs others goes first
    assert max(a["term"], b["term"]) < min(a["exit"], b["exit"])  # a and b together, not one after the other
    assert max(a["exit"], b["exit"]) <= infra["term"]  # the earlier wave last
    assert supervisor.running == [] and supervisor.waves == []
