"""Progress where no one watches a terminal: plain lines at each tenth, and a line as a step starts and ends
(alignloop/console_progress.py), and a pipeline run's steps as lines (alignloop/pipeline_cli.py: StepLog)."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from alignloop.console_progress import ProgressBar, clock, working
from alignloop.pipeline_cli import StepLog


def log_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=80), out


def counts(text: str, label: str) -> list[str]:
    """The "done/total" of every line of `label`."""
    return re.findall(rf"\] {re.escape(label)}: (\d+/\d+)", text)


def test_clock() -> None:
    assert [clock(s) for s in (0, 12.7, 65, 3600 + 2 * 60 + 5, -3)] == ["0s", "12s", "1m05s", "1h02m", "0s"]


def test_a_log_gets_a_line_at_each_tenth_and_at_the_end_with_the_note() -> None:
    console, out = log_console()
    label = "training the reward model on the feedback snapshot"  # lines longer than the console's 80
    with ProgressBar(console, label, 100, unit=" steps") as bar:
        for step in range(1, 101):
            bar.update(step, f"loss {1 / step:.4f}")
    text = out.getvalue()
    assert counts(text, label) == [f"{10 * k}/100" for k in range(1, 11)]
    lines = text.splitlines()
    assert "10/100 steps  loss 0.1000  (" in lines[0] and "left)" in lines[0]
    assert "100/100 steps  loss 0.0100  (" in lines[-1] and "left" not in lines[-1]  # done: no time left
    # Nothing else: no bar drawn into the file, not even at the end, and no line wrapped at the width.
    assert len(lines) == 10 and all(len(line) > 80 for line in lines)


def test_fewer_steps_than_tenths_gives_a_line_per_step_and_a_resumed_job_starts_where_it_was() -> None:
    console, out = log_console()
    with ProgressBar(console, "PPO", 4, unit=" iterations", done=1) as bar:
        for iteration in (2, 3, 4):
            bar.update(iteration)
    assert counts(out.getvalue(), "PPO") == ["2/4", "3/4", "4/4"]


def test_a_total_known_only_later_and_a_disabled_bar() -> None:
    console, out = log_console()
    with ProgressBar(console, "scoring", unit=" answers scored") as bar:
        for done in (25, 50, 75, 100):
            bar.update(done, total=100)
    assert counts(out.getvalue(), "scoring") == ["25/100", "50/100", "75/100", "100/100"]

    console, out = log_console()
    with ProgressBar(console, "PPO", 3, disable=True) as bar:  # a distributed job's other ranks
        for i in (1, 2, 3):
            bar.update(i)
    assert out.getvalue() == ""


def test_a_terminal_gets_the_bar_not_the_lines() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with ProgressBar(console, "SFT", 10, unit=" steps") as bar:
        for step in range(1, 11):
            bar.update(step, f"loss {step}")
    text = out.getvalue()
    assert "10/10" in text and "SFT" in text
    assert not counts(text, "SFT")  # the bar's own rendering, not the log lines


def run_with(*steps: dict) -> dict:
    base = {"status": "pending", "progress": 0.0, "detail": "", "started_at": None, "finished_at": None}
    return {"id": "run-1", "steps": [base | s for s in steps]}


def test_a_step_with_nothing_to_count_gets_a_line_as_it_starts_and_one_with_its_time_as_it_ends() -> None:
    console, out = log_console()
    with working(console, "writing /data/feedback-[2026]"):  # brackets: not read as rich markup
        assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] writing /data/feedback-\[2026\] \.\.\.\n", out.getvalue())
    assert re.fullmatch(r"\[[\d:]+\] writing /data/feedback-\[2026\] \.\.\.\n"
                        r"\[[\d:]+\] writing /data/feedback-\[2026\]: done in 0s\n", out.getvalue())
    console, out = log_console()
    with pytest.raises(RuntimeError), working(console, "uploading"):
        raise RuntimeError("the server went away")
    assert "done" not in out.getvalue()  # a step that failed is not reported done


def test_a_terminal_gets_a_spinner_for_a_step_not_lines() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80)
    with working(console, "writing /data/feedback-[2026]"):
        pass
    assert "...\n" not in out.getvalue() and "done in" not in out.getvalue()


def test_a_pipeline_runs_steps_as_lines_when_they_start_pass_a_tenth_or_end() -> None:
    log = StepLog()
    t0, t1 = "2026-12-07T10:00:00+00:00", "2026-12-07T10:01:05+00:00"
    assert log.lines(run_with({"name": "snapshot"}, {"name": "reward_train"})) == []  # all pending
    snapshot_running = {"name": "snapshot", "status": "running", "started_at": t0}
    snapshot_done = {"name": "snapshot", "status": "succeeded", "started_at": t0, "finished_at": t1}
    training = {"name": "reward_train", "status": "running", "started_at": t1}
    seen = [
        log.lines(run_with(snapshot_running, {"name": "reward_train"})),
        log.lines(run_with(snapshot_running, {"name": "reward_train"})),
        log.lines(run_with(snapshot_done | {"detail": "200 feedback"}, training | {"progress": 0.05})),
        log.lines(run_with(snapshot_done, training | {"progress": 0.34})),
        log.lines(run_with(snapshot_done, training | {"progress": 0.39})),
    ]
    texts = [[line.split("] ", 1)[1] for line in lines] for lines in seen]
    assert texts == [
        ["run-1 snapshot running"],
        [],  # nothing changed
        ["run-1 snapshot succeeded after 1m05s: 200 feedback", "run-1 reward_train running"],
        ["run-1 reward_train running 30%"],
        [],  # still in the same tenth
    ]
