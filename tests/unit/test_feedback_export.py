"""pipelines.feedback_export: pairs, pointwise labels and demonstrations from a SQLite store; hash; MLflow."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import insert

from alignloop import store
from alignloop.config import Settings
from alignloop.store.schema import Completion, Feedback
from pipelines.feedback_export import export_feedback

T1, T2 = "tenant-1", "tenant-2"
T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def _prompt(text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def _phash(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


def _mjson(messages: list[dict]) -> str:
    return json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


P1, P2, P3, P4, P5 = (_prompt(t) for t in ("rank these", "compare these", "vote", "other a", "other b"))


class Store:
    """A migrated SQLite store in tmp_path with helpers that insert rows the way the materializer would."""

    def __init__(self, path: Path) -> None:
        self.url = f"sqlite:///{path}"
        store.upgrade(self.url)
        self.engine = store.connect(self.url)
        self.clock = 0

    def completion(self, cid: str, tenant: str, messages: list[dict], text: str, version: str = "1") -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(Completion), [{
                "completion_id": cid, "response_id": f"r-{cid}", "choice_index": 0, "api_key_hash": tenant,
                "prompt_hash": _phash(messages), "messages": messages, "response_text": text,
                "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 4,
                "model_name": "alignloop-policy", "model_version": version, "sampling": {"temperature": 1.0},
                "stream": False,
                "created_at": T0, "finished_at": T0, "ingested_at": T0,
            }])

    def feedback(self, fid: str, tenant: str, kind: str, ids: list[str], messages: list[dict],
                 created_at: datetime | None = None, **values) -> None:
        self.clock += 1
        created = created_at or T0 + timedelta(minutes=self.clock)
        row = {
            "feedback_id": fid, "client_feedback_id": None, "request_hash": "h", "api_key_hash": tenant,
            "kind": kind, "completion_id": ids[0], "completion_ids": ids, "thumbs_up": None, "rating": None,
            "preferred_completion_id": None, "comment": None, "correction": None, "fails_instruction": False,
            "hallucination": False, "inappropriate": False, "prompt_hash": _phash(messages),
            "model_name": "alignloop-policy", "model_version": "1", "model_versions": ["1"] * len(ids),
            "day": created.strftime("%Y-%m-%d"), "created_at": created, "accepted_at": created,
            "ingested_at": created, "kafka_partition": 0, "kafka_offset": self.clock,
        }
        row.update(values)
        with self.engine.begin() as conn:
            conn.execute(insert(Feedback), [row])


@pytest.fixture
def db(tmp_path: Path) -> Store:
    s = Store(tmp_path / "feedback.db")
    for i in range(1, 5):  # a ranking of K=4 answers; c4 comes from model version 2
        s.completion(f"c{i}", T1, P1, f"answer c{i}", version="2" if i == 4 else "1")
    s.feedback("f-rank", T1, "ranking", ["c3", "c1", "c4", "c2"], P1)
    s.completion("d1", T1, P2, "answer d1")
    s.completion("d2", T1, P2, "answer d2")
    s.feedback("f-cmp", T1, "comparison", ["d1", "d2"], P2, preferred_completion_id="d2")
    s.feedback("f-cmp-again", T1, "comparison", ["d2", "d1"], P2, preferred_completion_id="d2")
    s.completion("e1", T1, P3, "answer e1")
    s.completion("e2", T1, P3, "answer e2")
    s.feedback("f-up", T1, "thumbs", ["e1"], P3, thumbs_up=True)
    s.feedback("f-down", T1, "thumbs", ["e2"], P3, thumbs_up=False, correction="the answer I wanted",
               comment="too long", fails_instruction=True)
    # Same prompt, another tenant: must never pair with e1.
    s.completion("k1", T2, P3, "answer k1")
    s.feedback("f-other-tenant", T2, "thumbs", ["k1"], P3, thumbs_up=False)
    # Up and down on different prompts: no pair.
    s.completion("g1", T1, P4, "answer g1")
    s.completion("h1", T1, P5, "answer h1")
    s.feedback("f-g1", T1, "thumbs", ["g1"], P4, thumbs_up=True, correction="   ")  # blank: no demonstration
    s.feedback("f-h1", T1, "thumbs", ["h1"], P5, thumbs_up=False)
    s.feedback("f-rating", T1, "rating", ["d1"], P2, rating=6, hallucination=True)
    # Completions not in the store (yet): skipped, counted.
    s.feedback("f-missing", T1, "thumbs", ["e-missing"], P3, thumbs_up=True, correction="x")
    s.feedback("f-rank-missing", T1, "ranking", ["c1", "c-missing"], P1)
    return s


def _export(db: Store, tmp_path: Path, name: str, **kwargs):
    settings = Settings(home=tmp_path / "home", store_url=db.url)
    return export_feedback(settings, out=tmp_path / name, log_mlflow=False, **kwargs)


def test_pairs(db: Store, tmp_path: Path) -> None:
    result = _export(db, tmp_path, "out")
    pairs = pd.read_parquet(result.folder / "pairs.parquet")
    got = [(r.source, r.group, r.chosen_completion_id, r.rejected_completion_id) for r in pairs.itertuples()]
    assert got == [
        ("comparison", "f-cmp", "d2", "d1"),
        ("ranking", "f-rank", "c3", "c1"), ("ranking", "f-rank", "c3", "c4"),
        ("ranking", "f-rank", "c3", "c2"), ("ranking", "f-rank", "c1", "c4"),
        ("ranking", "f-rank", "c1", "c2"), ("ranking", "f-rank", "c4", "c2"),
        ("thumbs", f"thumbs:{T1}:{_phash(P3)}", "e1", "e2"),
    ]
    ranking = pairs[pairs.source == "ranking"]
    ranks = list(zip(ranking.chosen_rank, ranking.rejected_rank))
    assert ranks == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert set(ranking.ranking_id) == {"f-rank"} and set(ranking.prompt_hash) == {_phash(P1)}
    assert list(ranking.chosen) == ["answer c3"] * 3 + ["answer c1"] * 2 + ["answer c4"]
    assert list(ranking.rejected) == ["answer c1", "answer c4", "answer c2", "answer c4", "answer c2",
                                      "answer c2"]
    assert list(ranking.model_version_chosen) == ["1", "1", "1", "1", "1", "2"]
    assert list(ranking.model_version_rejected) == ["1", "2", "1", "2", "1", "1"]
    assert set(ranking.messages) == {_mjson(P1)}

    cmp_, thumbs = pairs.iloc[0], pairs.iloc[7]
    assert list(cmp_.feedback_ids) == ["f-cmp", "f-cmp-again"] and cmp_.feedback_id == "f-cmp"
    assert pd.isna(cmp_.ranking_id) and pd.isna(cmp_.chosen_rank)
    assert (cmp_.chosen, cmp_.rejected, cmp_.messages) == ("answer d2", "answer d1", _mjson(P2))
    assert list(thumbs.feedback_ids) == ["f-up", "f-down"] and thumbs.api_key_hash == T1
    assert (thumbs.chosen, thumbs.rejected, thumbs.prompt_hash) == ("answer e1", "answer e2", _phash(P3))
    assert not (pairs.chosen_completion_id == pairs.rejected_completion_id).any()
    assert pairs.created_at.dt.tz is not None


def test_pointwise_and_demonstrations(db: Store, tmp_path: Path) -> None:
    result = _export(db, tmp_path, "out")
    point = pd.read_parquet(result.folder / "pointwise.parquet")
    assert list(point.feedback_id) == ["f-down", "f-g1", "f-h1", "f-other-tenant", "f-rating", "f-up"]
    assert list(point.completion_id) == ["e2", "g1", "h1", "k1", "d1", "e1"]
    assert list(point.label) == [0.0, 1.0, 0.0, 0.0, 5 / 6, 1.0]
    assert list(point.kind) == ["thumbs"] * 4 + ["rating", "thumbs"]
    rating = point.set_index("feedback_id").loc["f-rating"]
    assert rating.rating == 6 and rating.hallucination and not rating.fails_instruction
    assert (rating.response, rating.messages, rating.model_version) == ("answer d1", _mjson(P2), "1")
    assert point.rating.isna().sum() == 5 and pd.isna(rating.thumbs_up)
    down = point.set_index("feedback_id").loc["f-down"]
    assert down.fails_instruction and down.comment == "too long" and not down.thumbs_up

    demos = pd.read_parquet(result.folder / "demonstrations.parquet")
    assert demos.to_dict("records") == [{
        "feedback_id": "f-down", "kind": "thumbs", "api_key_hash": T1, "prompt_hash": _phash(P3),
        "completion_id": "e2", "messages": _mjson(P3), "demonstration": "the answer I wanted",
        "original_response": "answer e2", "comment": "too long", "model_version": "1",
        "created_at": pd.Timestamp(T0 + timedelta(minutes=5)),
    }]


def test_manifest_counts_skipped_feedback(db: Store, tmp_path: Path) -> None:
    result = _export(db, tmp_path, "out")
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["hash"] == result.hash and len(result.hash) == 64
    assert manifest["rows"] == {"pairs": 8, "pointwise": 6, "demonstrations": 1}
    assert manifest["pairs_by_source"] == {"comparison": 1, "ranking": 6, "thumbs": 1}
    assert manifest["feedback"] == 11
    assert manifest["skipped"]["total"] == 2 and manifest["skipped"]["by_kind"] == {"ranking": 1, "thumbs": 1}
    assert manifest["invalid"] == 0 and manifest["since"] is None
    assert manifest["store"] == db.url
    assert set(manifest["files"]) == {"pairs.parquet", "pointwise.parquet", "demonstrations.parquet"}
    assert result.counts == {"pairs": 8, "pointwise": 6, "demonstrations": 1, "feedback": 11, "skipped": 2,
                             "invalid": 0}
    assert result.mlflow_run_id is None
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_hash_is_stable_and_follows_the_contents(db: Store, tmp_path: Path) -> None:
    first, second = _export(db, tmp_path, "a"), _export(db, tmp_path, "b")
    assert first.hash == second.hash
    assert json.loads((first.folder / "manifest.json").read_text())["files"] == \
        json.loads((second.folder / "manifest.json").read_text())["files"]
    db.feedback("f-rating-2", T1, "rating", ["d2"], P2, rating=1)
    third = _export(db, tmp_path, "c")
    assert third.hash != first.hash and third.counts["pointwise"] == 7


def test_default_folder_and_existing_folder(db: Store, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", store_url=db.url)
    result = export_feedback(settings, log_mlflow=False)
    assert result.folder.parent == tmp_path / "home" / "datasets"
    assert result.folder.name.startswith("feedback-") and result.folder.name.endswith(f"-{result.hash[:12]}")
    with pytest.raises(FileExistsError):
        export_feedback(settings, out=result.folder, log_mlflow=False)


def test_latest_thumbs_vote_wins_and_identical_rankings_merge(db: Store, tmp_path: Path) -> None:
    db.feedback("f-up-changed", T1, "thumbs", ["e2"], P3, thumbs_up=True)  # e2 is now up: no e1/e2 pair
    db.feedback("f-rank-again", T1, "ranking", ["c3", "c1", "c4", "c2"], P1)
    db.feedback("f-rank-other", T1, "ranking", ["c2", "c3"], P1)
    pairs = pd.read_parquet(_export(db, tmp_path, "out").folder / "pairs.parquet")
    assert "thumbs" not in set(pairs.source)
    ranking = pairs[pairs.source == "ranking"]
    assert list(ranking.group.value_counts().sort_index().items()) == [("f-rank", 6), ("f-rank-other", 1)]
    merged = ranking[ranking.group == "f-rank"].feedback_ids
    assert all(list(ids) == ["f-rank", "f-rank-again"] for ids in merged)
    other = ranking[ranking.group == "f-rank-other"].iloc[0]
    assert (other.chosen_completion_id, other.rejected_completion_id) == ("c2", "c3")


def test_since_filters_by_day(db: Store, tmp_path: Path) -> None:
    db.feedback("f-late", T1, "rating", ["d2"], P2, rating=7, created_at=T0 + timedelta(days=2))
    result = _export(db, tmp_path, "out", since=date(2026, 11, 21))
    assert result.counts == {"pairs": 0, "pointwise": 1, "demonstrations": 0, "feedback": 1, "skipped": 0,
                             "invalid": 0}
    assert json.loads((result.folder / "manifest.json").read_text())["since"] == "2026-11-21"


def test_feedback_breaking_its_kinds_rules_is_counted_not_used(db: Store, tmp_path: Path) -> None:
    db.feedback("f-bad-cmp", T1, "comparison", ["d1", "d2"], P2, preferred_completion_id="c1")
    db.feedback("f-bad-rank", T1, "ranking", ["c1", "c2", "c1"], P1)
    db.feedback("f-bad-rating", T1, "rating", ["d1"], P2, rating=9)
    result = _export(db, tmp_path, "out")
    assert result.counts["invalid"] == 3 and result.counts["pairs"] == 8 and result.counts["pointwise"] == 6


def test_cli_export(db: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from alignloop import cli

    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ALIGNLOOP_STORE_URL", db.url)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["feedback", "export", "--no-mlflow", "--out", str(tmp_path / "cli"),
                  "--since", "2026-11-20"])
    assert exit_.value.code == 0
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["rows"]["pairs"] == 8


def test_cli_export_logs_each_step_on_stderr_and_leaves_stdout_to_the_json(
        db: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from alignloop import cli

    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ALIGNLOOP_STORE_URL", db.url)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["feedback", "export", "--no-mlflow", "--json", "--out", str(tmp_path / "cli")])
    assert exit_.value.code == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["counts"]["pairs"] == 8  # all of stdout: a script can pipe it to jq
    # Where no one watches a terminal (a pipeline step's log), every step has a line as it starts and ends.
    for step in ("reading feedback", "building pairs, labels and demonstrations", f"writing {tmp_path / 'cli'}"):
        assert f"] {step} ...\n" in err and f"] {step}: done in " in err, err
    assert "] reading the completions the feedback names: " in err


def test_logs_a_dataset_to_mlflow(db: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    # The export sets the process-wide tracking URI; put it back afterwards.
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    # Created here only to keep artifacts in tmp_path: without a server they would go to ./mlruns.
    client.create_experiment("alignloop-datasets", artifact_location=(tmp_path / "artifacts").as_uri())
    settings = Settings(home=tmp_path / "home", store_url=db.url, mlflow_tracking_uri=uri)
    result = export_feedback(settings, out=tmp_path / "out")

    run = client.get_run(result.mlflow_run_id)
    assert run.info.run_name == f"feedback-{result.hash[:12]}"
    assert run.data.tags["alignloop.dataset_hash"] == result.hash
    assert run.data.metrics["rows_pairs"] == 8 and run.data.params["dataset_hash"] == result.hash
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"feedback-pairs", "feedback-pointwise", "feedback-demonstrations"}
    pairs = inputs["feedback-pairs"]
    assert pairs.dataset.digest == result.hash[:12]
    assert {t.key: t.value for t in pairs.tags}["mlflow.data.context"] == "training"
    assert str(tmp_path / "out") in pairs.dataset.source
    assert {f.path for f in client.list_artifacts(result.mlflow_run_id, "dataset")} == {
        "dataset/manifest.json", "dataset/pairs.parquet", "dataset/pointwise.parquet",
        "dataset/demonstrations.parquet"}
