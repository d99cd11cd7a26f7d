"""Snapshot of the feedback store for training: preference pairs, pointwise labels, demonstrations.

Three Parquet tables, a manifest and (optionally) an MLflow dataset run, in one folder:

  * pairs.parquet           (chosen, rejected) answers to one prompt, for the reward model (InstructGPT §3.5)
      ranking      all C(K,2) pairs of a ranking of K answers; the better-ranked one is chosen. `group` ==
                   `ranking_id`, so a trainer can put all pairs of one ranking in one batch element.
      comparison   one pair: the preferred answer is chosen.
      thumbs       per tenant and prompt, every (up-voted, down-voted) pair of answers. A completion's vote is
                   its tenant's latest thumbs feedback on it (created_at, then feedback_id), so a changed
                   mind replaces the earlier vote instead of contradicting it. `group` = thumbs:TENANT:PROMPT.
  * pointwise.parquet       one row per thumbs or rating feedback: label 1.0/0.0, or (rating - 1) / 6.
  * demonstrations.parquet  one row per feedback with a non-blank correction: the answer the user wanted.

Deduplication, always within one tenant (never across `api_key_hash`):
  * identical rankings (same completions in the same order) are one ranking; its `ranking_id` is the first
    one's feedback_id and `feedback_ids` lists all. Different rankings keep all their pairs, even a pair that
    also occurs in another ranking: dropping it would break that ranking's C(K,2) group.
  * comparisons giving the same (chosen, rejected) are one pair, listing all their feedback_ids.
  * thumbs pairs are unique by construction (one vote per completion).
  * a pair whose chosen and rejected completion are the same is dropped.
"First" is always the earliest (created_at, feedback_id).

Feedback that names a completion not (yet) in the store is skipped from every table and counted in the
manifest (`skipped`); feedback that breaks its kind's shape (say, a comparison whose preferred answer is not
one of the two) is counted as `invalid`. Rows are sorted by stable keys, and the content hash is a sha256 over
a canonical JSON form of the sorted rows, so the same store contents give the same hash on SQLite and
PostgreSQL alike.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url

from alignloop import store
from alignloop.config import Settings
from alignloop.console_progress import ProgressBar, working
from alignloop.store.schema import Completion, Feedback
from pipelines.models_init import tracking_uri as use_tracking_uri

EXPERIMENT_NAME = "alignloop-datasets"
FORMAT_VERSION = 1  # part of the hash: a change of layout must not look like the same dataset
TABLES = ("pairs", "pointwise", "demonstrations")
IN_CHUNK = 500  # completion ids per SELECT ... IN: SQLite caps the bound parameters of one statement

_TS = pa.timestamp("us", tz="UTC")
SCHEMAS: dict[str, pa.Schema] = {
    "pairs": pa.schema([
        ("source", pa.string()), ("group", pa.string()), ("ranking_id", pa.string()),
        ("prompt_hash", pa.string()), ("api_key_hash", pa.string()), ("messages", pa.string()),
        ("chosen_completion_id", pa.string()), ("rejected_completion_id", pa.string()),
        ("chosen", pa.string()), ("rejected", pa.string()),
        ("chosen_rank", pa.int32()), ("rejected_rank", pa.int32()),  # 0 = best; ranking pairs only
        ("model_version_chosen", pa.string()), ("model_version_rejected", pa.string()),
        ("feedback_id", pa.string()), ("feedback_ids", pa.list_(pa.string())), ("created_at", _TS),
    ]),
    "pointwise": pa.schema([
        ("feedback_id", pa.string()), ("kind", pa.string()), ("api_key_hash", pa.string()),
        ("prompt_hash", pa.string()), ("completion_id", pa.string()), ("messages", pa.string()),
        ("response", pa.string()), ("label", pa.float64()), ("rating", pa.int32()), ("thumbs_up", pa.bool_()),
        ("fails_instruction", pa.bool_()), ("hallucination", pa.bool_()), ("inappropriate", pa.bool_()),
        ("comment", pa.string()), ("model_version", pa.string()), ("created_at", _TS),
    ]),
    "demonstrations": pa.schema([
        ("feedback_id", pa.string()), ("kind", pa.string()), ("api_key_hash", pa.string()),
        ("prompt_hash", pa.string()), ("completion_id", pa.string()), ("messages", pa.string()),
        ("demonstration", pa.string()), ("original_response", pa.string()), ("comment", pa.string()),
        ("model_version", pa.string()), ("created_at", _TS),
    ]),
}
SORT_KEYS: dict[str, tuple[str, ...]] = {
    "pairs": ("source", "group", "chosen_rank", "rejected_rank",
              "chosen_completion_id", "rejected_completion_id"),
    "pointwise": ("feedback_id",),
    "demonstrations": ("feedback_id",),
}

_FEEDBACK_COLUMNS = ("feedback_id", "api_key_hash", "kind", "completion_id", "completion_ids", "thumbs_up",
                     "rating", "preferred_completion_id", "comment", "correction", "fails_instruction",
                     "hallucination", "inappropriate", "prompt_hash", "created_at")
_COMPLETION_COLUMNS = ("completion_id", "messages", "response_text", "model_version")


class StoreNotReady(RuntimeError):
    """The store has no schema yet: nothing was ever written to it, or `alignloop store upgrade` never ran."""


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    hash: str
    counts: dict[str, int]  # rows per table, plus feedback read, skipped and invalid
    mlflow_run_id: str | None


# ---- reading ---------------------------------------------------------------------------------------------
def load_feedback(engine: Engine, since: date | None = None) -> list[dict]:
    """Feedback rows (created on or after `since`, UTC), oldest first."""
    table = Feedback.__table__
    stmt = select(*(table.c[c] for c in _FEEDBACK_COLUMNS))
    if since is not None:
        stmt = stmt.where(table.c.day >= since.isoformat())  # `day` is indexed; created_at is not
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(stmt).mappings()]
    for r in rows:
        r["created_at"] = store.as_utc(r["created_at"])
        r["completion_ids"] = list(r["completion_ids"] or [])
    rows.sort(key=lambda r: (r["created_at"], r["feedback_id"]))
    return rows


def load_completions(engine: Engine, ids: Iterable[str], advance: Callable[[int], Any] | None = None
                     ) -> dict[str, dict]:
    """The completions among `ids` that are in the store, by id; only those, since the table holds every
    answer ever served and feedback names few of them."""
    table = Completion.__table__
    wanted = sorted(set(ids))
    found: dict[str, dict] = {}
    with engine.connect() as conn:
        for start in range(0, len(wanted), IN_CHUNK):
            chunk = wanted[start:start + IN_CHUNK]
            stmt = select(*(table.c[c] for c in _COMPLETION_COLUMNS)).where(table.c.completion_id.in_(chunk))
            found.update((r["completion_id"], dict(r)) for r in conn.execute(stmt).mappings())
            if advance:
                advance(len(chunk))
    return found


# ---- building ----------------------------------------------------------------------------------------------
def _messages_json(messages: list) -> str:
    # sort_keys: PostgreSQL's JSONB reorders object keys, SQLite keeps them; the text must not depend on that.
    return json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _is_valid(fb: dict) -> bool:
    """The collector's rules for each kind; the store does not enforce them."""
    ids, kind = fb["completion_ids"], fb["kind"]
    if len(set(ids)) != len(ids):
        return False
    if kind == "thumbs":
        return fb["thumbs_up"] is not None and len(ids) == 1
    if kind == "rating":
        return fb["rating"] is not None and 1 <= fb["rating"] <= 7 and len(ids) == 1
    if kind == "ranking":
        return len(ids) >= 2
    if kind == "comparison":
        return len(ids) == 2 and fb["preferred_completion_id"] in ids
    return False


def _pair(source: str, group: str, fbs: list[dict], chosen: dict, rejected: dict, *,
          prompt_hash: str, ranks: tuple[int | None, int | None] = (None, None)) -> dict:
    first = fbs[0]
    return {
        "source": source, "group": group, "ranking_id": group if source == "ranking" else None,
        "prompt_hash": prompt_hash, "api_key_hash": first["api_key_hash"],
        "messages": _messages_json(chosen["messages"]),
        "chosen_completion_id": chosen["completion_id"], "rejected_completion_id": rejected["completion_id"],
        "chosen": chosen["response_text"], "rejected": rejected["response_text"],
        "chosen_rank": ranks[0], "rejected_rank": ranks[1],
        "model_version_chosen": chosen["model_version"], "model_version_rejected": rejected["model_version"],
        "feedback_id": first["feedback_id"], "feedback_ids": [f["feedback_id"] for f in fbs],
        "created_at": first["created_at"],
    }


def build_pairs(feedback: list[dict], completions: dict[str, dict]) -> list[dict]:
    """Preference pairs from usable ranking, comparison and thumbs feedback (oldest first); see the module
    docstring for the rules."""
    rankings: dict[tuple, list[dict]] = defaultdict(list)
    comparisons: dict[tuple, list[dict]] = defaultdict(list)
    latest_vote: dict[tuple[str, str], dict] = {}
    for fb in feedback:  # oldest first, so list[0] is the first and the last vote wins
        tenant = fb["api_key_hash"]
        if fb["kind"] == "ranking":
            rankings[(tenant, tuple(fb["completion_ids"]))].append(fb)
        elif fb["kind"] == "comparison":
            a, b = fb["completion_ids"]
            preferred = fb["preferred_completion_id"]
            comparisons[(tenant, preferred, b if preferred == a else a)].append(fb)
        elif fb["kind"] == "thumbs":
            latest_vote[(tenant, fb["completion_id"])] = fb

    pairs = []
    for (_, ids), fbs in rankings.items():
        ranking_id = fbs[0]["feedback_id"]
        for i, j in itertools.combinations(range(len(ids)), 2):
            if ids[i] != ids[j]:
                pairs.append(_pair("ranking", ranking_id, fbs, completions[ids[i]], completions[ids[j]],
                                   prompt_hash=fbs[0]["prompt_hash"], ranks=(i, j)))
    for (_, chosen, rejected), fbs in comparisons.items():
        if chosen != rejected:
            pairs.append(_pair("comparison", fbs[0]["feedback_id"], fbs, completions[chosen],
                               completions[rejected], prompt_hash=fbs[0]["prompt_hash"]))
    votes: dict[tuple[str, str], dict[bool, list[dict]]] = defaultdict(lambda: {True: [], False: []})
    for fb in latest_vote.values():
        votes[(fb["api_key_hash"], fb["prompt_hash"])][bool(fb["thumbs_up"])].append(fb)
    for (tenant, prompt), by_value in votes.items():
        for up, down in itertools.product(by_value[True], by_value[False]):
            # Order the two votes like everywhere else, so `feedback_id` is the older one.
            fbs = sorted([up, down], key=lambda f: (f["created_at"], f["feedback_id"]))
            pairs.append(_pair("thumbs", f"thumbs:{tenant}:{prompt}", fbs, completions[up["completion_id"]],
                               completions[down["completion_id"]], prompt_hash=prompt))
    return pairs


def build_pointwise(feedback: list[dict], completions: dict[str, dict]) -> list[dict]:
    """One labelled answer per usable thumbs or rating feedback; every vote counts, not only the latest."""
    rows = []
    for fb in feedback:
        if fb["kind"] not in ("thumbs", "rating"):
            continue
        c = completions[fb["completion_id"]]
        label = (1.0 if fb["thumbs_up"] else 0.0) if fb["kind"] == "thumbs" else (fb["rating"] - 1) / 6
        rows.append({
            "feedback_id": fb["feedback_id"], "kind": fb["kind"], "api_key_hash": fb["api_key_hash"],
            "prompt_hash": fb["prompt_hash"], "completion_id": c["completion_id"],
            "messages": _messages_json(c["messages"]), "response": c["response_text"], "label": label,
            "rating": fb["rating"] if fb["kind"] == "rating" else None,
            "thumbs_up": bool(fb["thumbs_up"]) if fb["kind"] == "thumbs" else None,
            "fails_instruction": bool(fb["fails_instruction"]), "hallucination": bool(fb["hallucination"]),
            "inappropriate": bool(fb["inappropriate"]), "comment": fb["comment"],
            "model_version": c["model_version"], "created_at": fb["created_at"],
        })
    return rows


def build_demonstrations(feedback: list[dict], completions: dict[str, dict]) -> list[dict]:
    """One demonstration per usable feedback with a non-blank correction; `original_response` is the answer
    the feedback is about (the best-ranked one, for rankings), for reference."""
    rows = []
    for fb in feedback:
        if not (fb["correction"] or "").strip():
            continue
        c = completions[fb["completion_id"]]
        rows.append({
            "feedback_id": fb["feedback_id"], "kind": fb["kind"], "api_key_hash": fb["api_key_hash"],
            "prompt_hash": fb["prompt_hash"], "completion_id": c["completion_id"],
            "messages": _messages_json(c["messages"]), "demonstration": fb["correction"],
            "original_response": c["response_text"], "comment": fb["comment"],
            "model_version": c["model_version"], "created_at": fb["created_at"],
        })
    return rows


def _sorted(name: str, rows: list[dict]) -> list[dict]:
    def key(row: dict) -> tuple:
        # Ranks are None outside rankings: as -1 they still compare with the ints of ranking pairs.
        return tuple((-1 if row[k] is None else row[k]) if k.endswith("_rank") else row[k]
                     for k in SORT_KEYS[name])

    return sorted(rows, key=key)


def content_hash(tables: dict[str, list[dict]]) -> str:
    """sha256 over a canonical JSON form of the (sorted) rows of every table."""
    h = hashlib.sha256(f"alignloop-feedback-export/{FORMAT_VERSION}\n".encode())
    for name in TABLES:
        h.update(f"{name}\n".encode())
        for row in tables[name]:
            h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=datetime.isoformat).encode())
            h.update(b"\n")
    return h.hexdigest()


# ---- writing -----------------------------------------------------------------------------------------------
def _redacted(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_folder(folder: Path, tables: dict[str, pa.Table], manifest: dict) -> None:
    """Writes the tables and manifest.json into `folder`, which must not exist or be empty.

    Everything goes to a sibling `.partial` folder first and is renamed into place, so a folder that exists
    is always complete.
    """
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty")
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, table in tables.items():
        pq.write_table(table, partial / f"{name}.parquet")
    manifest["files"] = {f"{n}.parquet": _file_sha256(partial / f"{n}.parquet") for n in tables}
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if folder.exists():
        folder.rmdir()
    os.rename(partial, folder)


def log_to_mlflow(tracking_uri: str, folder: Path, frames: dict[str, pd.DataFrame], manifest: dict) -> str:
    """One run in experiment "alignloop-datasets", named after the hash, with the tables as dataset inputs
    (so training runs can cite the same digest) and the folder as artifacts; returns the run id."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        try:
            experiment_id = client.create_experiment(EXPERIMENT_NAME)
        except MlflowException:  # created concurrently by another export
            experiment_id = client.get_experiment_by_name(EXPERIMENT_NAME).experiment_id
    short = manifest["hash"][:12]  # MLflow caps dataset digests at 36 characters; the full hash is a tag
    tags = {"alignloop.dataset_hash": manifest["hash"], "alignloop.kind": "feedback-export"}
    with use_tracking_uri(tracking_uri), \
            mlflow.start_run(experiment_id=experiment_id, run_name=f"feedback-{short}", tags=tags) as run:
        with warnings.catch_warnings():
            # MLflow's own noise: it registers the local-path source class twice, its schema inference reads a
            # tz-aware column through an API pandas 3 deprecates, and it hints at integer columns (model
            # signatures, not datasets).
            for message in ("The specified dataset source can be interpreted",
                            "Series.values returning an ndarray that drops timezone",
                            "Hint: Inferred schema contains integer column"):
                warnings.filterwarnings("ignore", message=message)
            for name in TABLES:
                if name == "pairs" or not frames[name].empty:
                    dataset = mlflow.data.from_pandas(frames[name], source=str(folder),
                                                      name=f"feedback-{name}", digest=short)
                    mlflow.log_input(dataset, context="training")
        mlflow.log_params({"dataset_hash": manifest["hash"], "since": manifest["since"] or "",
                           "store": manifest["store"], "format_version": FORMAT_VERSION})
        mlflow.log_metrics({f"rows_{n}": v for n, v in manifest["rows"].items()}
                           | {"feedback": manifest["feedback"], "skipped": manifest["skipped"]["total"],
                              "invalid": manifest["invalid"]})
        mlflow.log_artifacts(str(folder), artifact_path="dataset")
    return run.info.run_id


# ---- entry point -------------------------------------------------------------------------------------------
def export_feedback(
    settings: Settings,
    *,
    out: Path | None = None,
    since: date | None = None,
    log_mlflow: bool = True,
    console: Console | None = None,
) -> ExportResult:
    """Exports the store at settings.store into `out` (default ALIGNLOOP_HOME/datasets/feedback-TS-HASH12/)
    and, unless `log_mlflow` is false, logs it to the tracking server at settings.tracking_uri."""
    console = console or Console()
    engine = store.connect(settings.store)
    try:
        if store.current_revision(engine) is None:
            raise StoreNotReady(f"the store {_redacted(settings.store)} has no schema: "
                                "run `alignloop store upgrade`")
        # Feedback first, completions second: what the materializer adds in between can only make more of the
        # feedback read usable; what a retention pass deletes in between is skipped and counted.
        with working(console, "reading feedback" + (f" since {since.isoformat()}" if since else "")):
            feedback = load_feedback(engine, since)
        referenced = {cid for fb in feedback for cid in fb["completion_ids"]} | \
                     {fb["completion_id"] for fb in feedback}
        with ProgressBar(console, "reading the completions the feedback names", len(referenced)) as bar:
            completions = load_completions(engine, referenced, lambda n: bar.update(bar.done + n))
    finally:
        engine.dispose()

    invalid = [fb for fb in feedback if not _is_valid(fb)]
    valid = [fb for fb in feedback if _is_valid(fb)]
    skipped = [fb for fb in valid
               if any(c not in completions for c in [fb["completion_id"], *fb["completion_ids"]])]
    skipped_ids = {fb["feedback_id"] for fb in skipped}
    usable = [fb for fb in valid if fb["feedback_id"] not in skipped_ids]

    with working(console, "building pairs, labels and demonstrations"):
        rows = {"pairs": build_pairs(usable, completions), "pointwise": build_pointwise(usable, completions),
                "demonstrations": build_demonstrations(usable, completions)}
        rows = {name: _sorted(name, r) for name, r in rows.items()}
        digest = content_hash(rows)
        tables = {name: pa.Table.from_pylist(rows[name], schema=SCHEMAS[name]) for name in TABLES}

    created = datetime.now(UTC)
    folder = Path(out).expanduser().resolve() if out else settings.home / "datasets" / \
        f"feedback-{created.strftime('%Y%m%dT%H%M%SZ')}-{digest[:12]}"
    manifest = {
        "hash": digest,
        "format_version": FORMAT_VERSION,
        "created_at": created.isoformat(timespec="seconds"),
        "store": _redacted(settings.store),
        "since": since.isoformat() if since else None,
        "feedback": len(feedback),
        "feedback_by_kind": dict(sorted(Counter(fb["kind"] for fb in feedback).items())),
        "skipped": {"total": len(skipped), "reason": "names a completion not in the store",
                    "by_kind": dict(sorted(Counter(fb["kind"] for fb in skipped).items()))},
        "invalid": len(invalid),
        "rows": {name: tables[name].num_rows for name in TABLES},
        "pairs_by_source": dict(sorted(Counter(p["source"] for p in rows["pairs"]).items())),
    }
    with working(console, f"writing {folder}"):
        write_folder(folder, tables, manifest)

    run_id = None
    if log_mlflow:
        with working(console, f"logging the dataset to MLflow at {settings.tracking_uri}"):
            frames = {name: table.to_pandas() for name, table in tables.items()}
            run_id = log_to_mlflow(settings.tracking_uri, folder, frames, manifest)
    counts = {**manifest["rows"], "feedback": len(feedback), "skipped": len(skipped), "invalid": len(invalid)}
    return ExportResult(folder=folder, hash=digest, counts=counts, mlflow_run_id=run_id)
