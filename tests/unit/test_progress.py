"""alignloop.progress: the file a step's process keeps its progress in, and Stages, which turns a job's
consecutive stages into one fraction that only rises. `progress_reports` (tests/conftest.py) records each
report."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignloop import progress


def test_report_writes_one_json_object_and_nothing_without_the_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(progress.ENV, raising=False)
    progress.report(1, 2)
    assert list(tmp_path.iterdir()) == []
    path = tmp_path / "p.json"
    monkeypatch.setenv(progress.ENV, str(path))
    progress.report(3, 10, reward=0.5)
    assert progress.read(path) == {"done": 3, "total": 10, "reward": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # the partial file was renamed, not left
    assert progress.read(tmp_path / "missing.json") is None


def test_each_stage_owns_a_share_in_proportion_to_its_weight(progress_reports) -> None:
    path, seen = progress_reports
    stages = progress.Stages(training=6, scoring=3, shift=1)
    stages.update("training", 5, 10)  # half of 60%
    stages.update("training", 10, 10)
    stages.update("scoring", 1, 3)  # 60% + a third of 30%
    stages.update("shift", 1, 1)
    assert [(r["done"], r["detail"]) for r in seen] == [
        (300, "training 5/10"), (600, "training 10/10"), (700, "scoring 1/3"), (1000, "shift 1/1")]
    assert all(r["total"] == progress.Stages.RESOLUTION for r in seen)
    assert progress.read(path)["done"] == 1000


def test_the_fraction_never_falls_and_repeats_are_not_written(progress_reports) -> None:
    _, seen = progress_reports
    stages = progress.Stages(a=1, b=1)
    stages.update("b", 1, 2)  # 75%
    stages.update("a", 1, 2)  # 25%: behind what was reported, so not reported
    stages.update("b", 1, 2)  # no change
    stages.update("b", 2, 2)
    assert [r["done"] for r in seen] == [750, 1000]


def test_a_skipped_stage_leaves_its_share_for_the_end_and_zero_weights_get_none(progress_reports) -> None:
    _, seen = progress_reports
    stages = progress.Stages(training=1, nothing=0, champion=1)
    stages.update("training", 4, 4)
    stages.update("nothing", 1, 1)  # owns no share: where training ended, reported again for its detail
    # The champion stage never runs: the job ends at half way, and the runner marks the step done itself.
    assert [(r["done"], r["detail"]) for r in seen] == [(500, "training 4/4"), (500, "nothing 1/1")]


def test_stages_known_only_by_name_and_all_zero_weights(progress_reports) -> None:
    _, seen = progress_reports
    stages = progress.Stages(**{"sampling the candidate": 0, "scoring both": 0})  # equal shares
    stages.stage("scoring both")(0, None)  # a stage that starts, with no count of its own
    assert seen == [{"done": 500, "total": 1000, "detail": "scoring both"}]
    with pytest.raises(KeyError, match="no stage 'kl'"):
        stages.stage("kl")
    with pytest.raises(ValueError, match="weights >= 0"):
        progress.Stages(a=-1)
