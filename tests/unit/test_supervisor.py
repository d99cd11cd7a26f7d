"""The supervisor's start: components start together, each is named when it fails, `needs` delays a clock,
and a slow start says what it is doing."""

from __future__ import annotations

import io
import re
import sys
import time

import psutil
import pytest
from rich.console import Console

from alignloop.components import Component
from alignloop.config import Settings
from alignloop.supervisor import StackError, Supervisor, latest_line

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


# A component that logs as vLLM's engine does, then redraws a progress bar in place, taking its time.
STARTING = r"""
import sys, time
print("(EngineCore pid=42) INFO 12-07 21:13:23 [core.py:133] Initializing a V1 LLM engine", flush=True)
time.sleep(1.5)
for i in range(3):
    sys.stdout.write(f"\rLoading [backbone] shards: {i + 1}/3"); sys.stdout.flush()
time.sleep(60)
"""


def test_off_a_terminal_a_slow_start_prints_what_it_is_doing(supervisor, monkeypatch):
    monkeypatch.setattr("alignloop.supervisor.WAITING_LINE_EVERY_S", 1.0)
    engine = component("engine", ready_after(3.5), argv=[sys.executable, "-c", STARTING])
    supervisor.bring_up([engine, component("front", ready_after(3.7), needs=("engine",))])
    out = supervisor.console.file.getvalue()
    notes = [line for line in out.splitlines() if "starting" in line]
    assert len(notes) >= 2, out
    # Each line: the wall clock, what is still starting, the time so far, and the log line of the component
    # whose own start is under way (not `front`, which waits for it), without its logger's prefix.
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] starting engine, front \(\d+ s\); engine: .+", notes[0])
    assert notes[0].endswith("engine: Initializing a V1 LLM engine")
    assert notes[-1].endswith("engine: Loading [backbone] shards: 3/3")  # the brackets are text, not markup
    assert out.index(notes[-1]) < out.index("✓ engine")


def test_a_terminal_gets_the_spinner_and_no_lines(supervisor, monkeypatch):
    monkeypatch.setattr("alignloop.supervisor.WAITING_LINE_EVERY_S", 0.5)
    supervisor.console = Console(file=io.StringIO(), force_terminal=True, width=200)
    supervisor.bring_up([component("engine", ready_after(2.0), argv=[sys.executable, "-c", STARTING])])
    assert not re.search(r"\[\d\d:\d\d:\d\d\] starting", supervisor.console.file.getvalue())


@pytest.mark.parametrize(("written", "shown"), [
    ("(EngineCore pid=19680) INFO 12-07 21:14:55 [core.py:402] init engine took 92.42 s\n",
     "init engine took 92.42 s"),
    ("2026-12-07 21:12:36,509 INFO alignloop.policy: serving alignloop-policy version 1\n",
     "serving alignloop-policy version 1"),
    ("W1207 21:12:59.513000 19334 triton.py:53] Triton not available\n", "Triton not available"),
    ("[W1207 21:13:20.728956672 utils.cpp:68] Warning: NUMA binding\n", "Warning: NUMA binding"),
    ("Loading: 0/5 [00:00<?]\rLoading: 5/5 [00:01<00:00]\n\n  \n", "Loading: 5/5 [00:01<00:00]"),
    ("\x1b[32mready\x1b[0m\n", "ready"),
    ("a line longer than the limit of forty characters\n", "a line longer than the limit of forty c…"),
    ("", ""),
])
def test_latest_line_is_the_message_of_the_last_line(tmp_path, written, shown):
    log = tmp_path / "c.log"
    log.write_text("earlier line\n" * 2000 + written if written else "")
    assert latest_line(log, limit=40) == shown
    assert latest_line(tmp_path / "missing.log") == ""
