"""Preference data for the reward model: feedback snapshots and Anthropic HH-RLHF files.

Everything becomes RM input text through `alignloop.reward_model.render(messages, response)`, the function the
reward service uses too, so the model is trained on exactly the text it will be asked to score.

Two kinds of examples:
  * PreferenceGroup  distinct answers to one prompt and the (winner, loser) pairs among them. A ranking of K
                     answers is ONE group of C(K,2) pairs (InstructGPT §3.5: treating its comparisons as
                     separate data points overfits, and each answer needs only one forward pass).
                     A comparison, a thumbs pair and an HH-RLHF line are groups of one pair.
  * PointwiseExample one answer with a label in [0, 1]: a thumbs vote (1/0) or a 1–7 rating ((r - 1) / 6).

Held-out split of a snapshot: by a hash of the snapshot's `group` column, so all pairs of a ranking, and all
thumbs pairs of one tenant's prompt, land on the same side. Pointwise rows are keyed like thumbs groups
(`thumbs:TENANT:PROMPT`), so a vote behind a held-out thumbs pair is never trained on. HH-RLHF files come
with their own split (`--train`, `--eval`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from alignloop.reward_model import render

# Snapshot sources whose pairs share one group (a ranking's C(K,2) pairs). Comparisons are single pairs
# anyway; thumbs pairs of one prompt are separate votes, so each is a group of its own (they still share a
# split key).
GROUPED_SOURCES = frozenset({"ranking"})
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass(frozen=True)
class PreferenceGroup:
    """Distinct answers to one prompt (rendered RM inputs) and (winner, loser) index pairs into `texts`."""

    group_id: str
    texts: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...]
    source: str = ""


@dataclass(frozen=True)
class PointwiseExample:
    """One rendered answer and its label in [0, 1] (1 = good)."""

    text: str
    label: float


@dataclass(frozen=True)
class DatasetInput:
    """One table a training run cites in MLflow (`mlflow.log_input`): name + digest identify it there."""

    frame: pd.DataFrame
    name: str
    source: str
    digest: str  # MLflow caps digests at 36 characters: the first 12 of a sha256


@dataclass
class RewardData:
    """Train and held-out examples, plus what MLflow needs to cite the dataset."""

    train_groups: list[PreferenceGroup]
    eval_groups: list[PreferenceGroup]
    train_pointwise: list[PointwiseExample]
    name: str  # MLflow dataset name
    hash: str  # sha256 of the data (snapshot: its manifest hash; files: their bytes)
    source: str  # the folder or the files, for MLflow and the model version's tags
    # MLflow dataset inputs by context ("training", "evaluation").
    inputs: dict[str, DatasetInput] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # why examples were left out, and how many

    @property
    def digest(self) -> str:
        """The MLflow dataset digest (MLflow caps digests at 36 characters)."""
        return self.hash[:12]

    @property
    def train_pairs(self) -> int:
        return sum(len(g.pairs) for g in self.train_groups)

    @property
    def eval_pairs(self) -> int:
        return sum(len(g.pairs) for g in self.eval_groups)


# ---- split --------------------------------------------------------------------------------------------
def split_value(key: str) -> float:
    """A uniform number in [0, 1) fixed by `key`: the same group is on the same side in every run."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2**64


def is_held_out(key: str, eval_fraction: float) -> bool:
    return split_value(key) < eval_fraction


# ---- feedback snapshots -------------------------------------------------------------------------------
def _messages(value: str | list) -> list[dict]:
    return json.loads(value) if isinstance(value, str) else list(value)


def groups_from_pairs(pairs: pd.DataFrame) -> tuple[list[tuple[str, PreferenceGroup]], int]:
    """(split key, group) for the rows of a snapshot's pairs table, in row order, and the number of pairs
    dropped because both sides render to the same text (no preference a model could express)."""
    answers: dict[str, dict[str, int]] = {}  # group id -> text -> index
    built: dict[str, tuple[str, str, list[tuple[int, int]]]] = {}  # group id -> (split key, source, pairs)
    dropped = 0
    for row in pairs.itertuples(index=False):
        messages = _messages(row.messages)
        chosen, rejected = render(messages, row.chosen), render(messages, row.rejected)
        if chosen == rejected:
            dropped += 1
            continue
        if row.source in GROUPED_SOURCES:
            gid = row.group
        else:
            ids = (getattr(row, "chosen_completion_id", None), getattr(row, "rejected_completion_id", None))
            gid = f"{row.group}/{ids[0]}>{ids[1]}" if all(ids) else f"{row.group}/{chosen}>{rejected}"
        index = answers.setdefault(gid, {})
        winner = index.setdefault(chosen, len(index))
        loser = index.setdefault(rejected, len(index))
        built.setdefault(gid, (row.group, row.source, []))[2].append((winner, loser))
    out = []
    for gid, (key, source, pair_list) in built.items():
        out.append((key, PreferenceGroup(gid, tuple(answers[gid]), tuple(dict.fromkeys(pair_list)), source)))
    return out, dropped


def pointwise_from_rows(rows: pd.DataFrame) -> list[tuple[str, PointwiseExample]]:
    """(split key, example) for a snapshot's pointwise table; the key matches the thumbs groups' `group`."""
    out = []
    for row in rows.itertuples(index=False):
        key = f"thumbs:{row.api_key_hash}:{row.prompt_hash}"
        out.append((key, PointwiseExample(render(_messages(row.messages), row.response), float(row.label))))
    return out


def _limit_groups(groups: Iterable[PreferenceGroup], limit: int | None) -> list[PreferenceGroup]:
    """Whole groups, in order, up to `limit` pairs in all."""
    out, pairs = [], 0
    for g in groups:
        if limit is not None and pairs + len(g.pairs) > limit:
            break
        out.append(g)
        pairs += len(g.pairs)
    return out


def _ensure_held_out(keyed: list[tuple[str, PreferenceGroup]], eval_fraction: float) -> set[str]:
    """The held-out split keys. If the hash puts none aside (a small snapshot) but there are at least two
    keys, the key with the smallest hash value is held out, so there is always something to gate on."""
    keys = {k for k, _ in keyed}
    held = {k for k in keys if is_held_out(k, eval_fraction)}
    if not held and eval_fraction > 0 and len(keys) >= 2:
        held = {min(keys, key=split_value)}
    return held


def load_snapshot(folder: Path, *, eval_fraction: float = 0.1, limit: int | None = None,
                  eval_limit: int | None = None) -> RewardData:
    """A `alignloop feedback export` folder as train/held-out preference groups and pointwise examples.

    `limit` caps the training pairs (whole groups) and pointwise rows, `eval_limit` the held-out pairs.
    """
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    pairs = pd.read_parquet(folder / "pairs.parquet")
    pointwise_path = folder / "pointwise.parquet"
    pointwise = pd.read_parquet(pointwise_path) if pointwise_path.exists() else pd.DataFrame()

    keyed, identical = groups_from_pairs(pairs)
    held = _ensure_held_out(keyed, eval_fraction)
    train = _limit_groups((g for k, g in keyed if k not in held), limit)
    held_out = _limit_groups((g for k, g in keyed if k in held), eval_limit)
    points = [p for k, p in pointwise_from_rows(pointwise) if k not in held] if not pointwise.empty else []
    if limit is not None:
        points = points[:limit]
    return RewardData(
        train_groups=train, eval_groups=held_out, train_pointwise=points,
        name=f"feedback-{manifest['hash'][:12]}", hash=manifest["hash"], source=str(folder.resolve()),
        # The name and digest `alignloop feedback export` logged the same table under: one dataset in MLflow.
        inputs={"training": DatasetInput(pairs, "feedback-pairs", str(folder.resolve()),
                                         manifest["hash"][:12])},
        dropped={"identical_pairs": identical},
    )


# ---- Anthropic HH-RLHF ----------------------------------------------------------------------------------
def parse_hh(transcript: str) -> tuple[list[dict], str]:
    """Splits an HH-RLHF transcript at its LAST "\\n\\nAssistant:" into chat messages and the final response.

    "Human" turns become user messages, "Assistant" turns assistant messages; text before the first turn (if
    any) a system message. The one space after each "Human:"/"Assistant:" belongs to the markup, so
    `render(*parse_hh(t)) == t` for well-formed transcripts.
    """
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn in the transcript")
    prompt, response = transcript[:cut], transcript[cut + len(HH_ASSISTANT):]
    pieces = _HH_TURN.split(prompt)  # [lead, role, text, role, text, ...]
    messages = [{"role": "system", "content": pieces[0]}] if pieces[0] else []
    for role, text in zip(pieces[1::2], pieces[2::2], strict=True):
        role = "user" if role == "Human" else "assistant"
        messages.append({"role": role, "content": text.removeprefix(" ")})
    return messages, response.removeprefix(" ")


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a .jsonl or .jsonl.gz file, one per non-blank line."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def hh_groups(rows: Sequence[dict], name: str) -> tuple[list[PreferenceGroup], dict[str, int]]:
    """One group of one pair per HH line, its source the file's `name`; drops lines whose two sides are
    identical or have no final assistant turn, and says how many."""
    groups, dropped = [], {"identical_pairs": 0, "unparsable": 0}
    for i, row in enumerate(rows):
        try:
            chosen, rejected = render(*parse_hh(row["chosen"])), render(*parse_hh(row["rejected"]))
        except (ValueError, KeyError, TypeError):
            dropped["unparsable"] += 1
            continue
        if chosen == rejected:
            dropped["identical_pairs"] += 1
            continue
        groups.append(PreferenceGroup(f"{name}:{i}", (chosen, rejected), ((0, 1),), name))
    return groups, dropped


def _files_sha256(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode() + b"\n")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_hh(train: Sequence[Path], eval: Sequence[Path], *, limit: int | None = None,
            eval_limit: int | None = None) -> RewardData:
    """HH-RLHF-format files ({"chosen": transcript, "rejected": transcript} per line) as train/eval groups.

    `limit` / `eval_limit` keep the first N usable pairs of the training / evaluation files.
    """
    def read(paths: Sequence[Path], cap: int | None) -> tuple[list[PreferenceGroup], pd.DataFrame, dict]:
        groups, frames, dropped = [], [], {"identical_pairs": 0, "unparsable": 0}
        for path in paths:
            rows = read_jsonl(Path(path))
            got, why = hh_groups(rows, Path(path).name)
            groups.extend(got)
            frames.append(pd.DataFrame(rows, columns=["chosen", "rejected"]))
            dropped = {k: dropped[k] + why[k] for k in dropped}
        return groups[:cap] if cap is not None else groups, pd.concat(frames, ignore_index=True), dropped

    def source(paths: Sequence[Path]) -> str:
        return " ".join(str(Path(p).resolve()) for p in paths)

    train_groups, train_frame, dropped_train = read(train, limit)
    eval_groups, eval_frame, dropped_eval = read(eval, eval_limit)
    return RewardData(
        train_groups=train_groups, eval_groups=eval_groups, train_pointwise=[],
        name="hh-rlhf", hash=_files_sha256([*train, *eval]), source=source([*train, *eval]),
        inputs={
            "training": DatasetInput(train_frame, "hh-rlhf-train", source(train), _files_sha256(train)[:12]),
            "evaluation": DatasetInput(eval_frame, "hh-rlhf-eval", source(eval), _files_sha256(eval)[:12]),
        },
        dropped={f"train_{k}": v for k, v in dropped_train.items()}
        | {f"eval_{k}": v for k, v in dropped_eval.items()},
    )
