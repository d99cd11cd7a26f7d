"""Progress of a long step, for whoever launched it: with ALIGNLOOP_PROGRESS_FILE set (the pipeline runner
sets it), `report` keeps that file holding {"done", "total", ...} as one JSON object, replaced atomically so a
reader never sees half of it. Without the variable it does nothing."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

ENV = "ALIGNLOOP_PROGRESS_FILE"


def report(done: int, total: int, **extra: float | str) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps({"done": done, "total": total, **extra}))
    os.replace(partial, target)


def read(path: Path) -> dict | None:
    """What the step last reported, or None (nothing yet, or unreadable)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class Stages:
    """A job made of consecutive stages (training, then scoring, ...) reported as one fraction that only
    rises, so a reader sees one bar move forward instead of one that restarts at each stage. Each stage owns a
    share of the way in proportion to its weight: use weights in one unit of work (forward passes, say) so
    that the fraction tracks time. A stage that is skipped leaves its share for the end."""

    RESOLUTION = 1000  # the report's `total`: the fraction in thousandths

    def __init__(self, **weights: float) -> None:
        if not weights or any(w < 0 for w in weights.values()):
            raise ValueError(f"stages need weights >= 0, not {weights}")
        if not sum(weights.values()):  # nothing to measure the stages by: equal shares
            weights = dict.fromkeys(weights, 1.0)
        whole = sum(weights.values())
        self._start: dict[str, float] = {}
        self._share: dict[str, float] = {}
        so_far = 0.0
        for name, weight in weights.items():
            self._start[name], self._share[name] = so_far, weight / whole
            so_far += weight / whole
        self._reported = -1

    def update(self, stage: str, done: int, total: int | None) -> None:
        """`done` of `total` units of `stage` are done; reports the job's fraction and, as `detail`, where the
        stage is ('training 120/235'). Never reports less than before."""
        within = min(1.0, done / total) if total else 0.0
        fraction = self._start[stage] + self._share[stage] * within
        permille = min(self.RESOLUTION, int(fraction * self.RESOLUTION + 1e-6))  # 0.6 + 0.3 + 0.1 < 1.0
        if permille <= self._reported and within < 1.0:
            return
        self._reported = max(permille, self._reported)
        report(self._reported, self.RESOLUTION, detail=f"{stage} {done}/{total}" if total else stage)

    def stage(self, name: str) -> Callable[[int, int | None], None]:
        """`update` bound to stage `name`: an (done, total) callback for code that knows nothing of stages."""
        if name not in self._start:
            raise KeyError(f"no stage {name!r}; the stages are {list(self._start)}")
        return lambda done, total: self.update(name, done, total)
