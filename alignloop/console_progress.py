"""Progress of long work on the console, readable where no one watches a terminal.

rich redraws a bar in place. Written to a file (a pipeline step's log, CI's output, `kubectl logs`), the same
bar shows nothing until the work is over. There `ProgressBar` prints a plain line at each tenth of the way
instead: how far, the caller's note on the latest step (a loss, a reward), the time so far and a rough time
left. A step with nothing to count (`working`) gets a line when it starts and one when it ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def clock(seconds: float) -> str:
    """'1h02m', '3m05s', '12s'."""
    hours, rest = divmod(max(int(seconds), 0), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def stamped(text: str) -> str:
    """`text` after the wall-clock time, as every progress line in a log starts: '[12:03:04] text'."""
    return f"[{time.strftime('%H:%M:%S')}] {text}"


@contextmanager
def working(console: Console, text: str) -> Iterator[None]:
    """A step with nothing to count (a query, a write, an upload): a spinner on a terminal; elsewhere a line as
    it starts, so a log shows which step a slow or stuck job is in, and one with its time as it ends. `text`
    is plain (no rich markup)."""
    if console.is_terminal:
        with console.status(escape(text)):
            yield
        return
    started = time.monotonic()
    console.print(stamped(f"{text} ..."), markup=False, highlight=False, soft_wrap=True)
    yield
    console.print(stamped(f"{text}: done in {clock(time.monotonic() - started)}"), markup=False,
                  highlight=False, soft_wrap=True)


class ProgressBar:
    """`total` steps of `label`: a bar on a terminal; elsewhere a line at each 1/`lines` of the way and at the
    end (so a line per step when there are fewer steps than `lines`). Use it as a context manager and call
    `update` with the steps done so far. `done` is where a resumed job starts; `disable` silences it (a
    distributed job's other ranks)."""

    def __init__(self, console: Console, label: str, total: int | None = None, *, unit: str = "",
                 lines: int = 10, done: int = 0, disable: bool = False) -> None:
        self.console = console
        self.label = label
        self.total = total
        self.unit = unit
        self.lines = lines
        self.done = done
        self._first = done
        self._started = time.monotonic()
        self._printed = self._mark(done)
        self._bar: Progress | None = None
        if not disable and console.is_terminal:
            self._bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[note]}"), console=console)
        self._silent = disable

    def __enter__(self) -> ProgressBar:
        if self._bar is not None:
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.done, note="")
        return self

    def __exit__(self, *exc_info) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc_info)

    def update(self, done: int, note: str = "", total: int | None = None) -> None:
        """`done` steps of `total` (set here when it was not known at the start); `note` on the latest."""
        if total is not None:
            self.total = total
        self.done = done
        if self._silent:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=self.total, note=note)
            return
        mark = self._mark(done)
        if mark > self._printed:
            self._printed = mark
            self.console.print(self.line(note), markup=False, highlight=False, soft_wrap=True)

    def line(self, note: str = "") -> str:
        """'[12:03:04] PPO: 3/10 iterations  reward +0.120  (1m05s, about 2m31s left)'."""
        elapsed = time.monotonic() - self._started
        timing = clock(elapsed)
        steps = self.done - self._first
        if self.total and 0 < steps and self.done < self.total:
            timing += f", about {clock(elapsed / steps * (self.total - self.done))} left"
        note = f"  {note}" if note else ""
        return stamped(f"{self.label}: {self.done}/{self.total}{self.unit}{note}  ({timing})")

    def _mark(self, done: int) -> int:
        """How many of the `lines` marks `done` has passed."""
        return done * self.lines // self.total if self.total else 0
