"""Progress of a long step, for whoever launched it: with ALIGNLOOP_PROGRESS_FILE set (the pipeline runner
sets it), `report` keeps that file holding {"done", "total", ...} as one JSON object, replaced atomically so a
reader never sees half of it. Without the variable it does nothing."""

from __future__ import annotations

import json
import os
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
