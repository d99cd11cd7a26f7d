"""Where `alignloop feedback export` snapshots live, for the jobs that train on the newest one."""

from __future__ import annotations

from pathlib import Path


def newest_snapshot(home: Path) -> Path | None:
    """The newest snapshot folder under HOME/datasets/ (names sort by time). The export renames a folder into
    place only once it is complete; the manifest check also skips folders that are not snapshots."""
    found = sorted(p for p in (Path(home) / "datasets").glob("feedback-*") if (p / "manifest.json").exists())
    return found[-1] if found else None
