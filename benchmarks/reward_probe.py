"""How much of HH-RLHF's preference signal the reward model's backbone carries before any fine-tuning.

A linear probe, not a trainer: the backbone stays frozen, each answer becomes a few features, and a pairwise
logistic regression (no intercept, L2, the RM's own loss −log σ(w·(f_chosen − f_rejected))) is fitted on
the training pairs and scored on the held-out ones. Same data and split as benchmarks/reward_training.py
(../shared/data/hh-rlhf, 20% held out by a hash of file:line), so its accuracies sit next to the fine-tuned
RM's. Features of an answer, all from the backbone's native sentence embedding (mean-pooled, L2-normalised,
as sentence-transformers uses all-MiniLM-L6-v2):

  length     log(1 + the answer's tokens, counted up to --max-length)
  relevance  cosine(embedding of the last user turn, embedding of the answer)
  embedding  the answer's embedding (384 numbers for MiniLM)

and, for the last feature set, length and relevance times the question's embedding: their weights may then
depend on what was asked, a label-free way to tell a harmful request from a benign one.

Each feature set is also fitted "with split": its features again, multiplied by 1 for pairs from
helpful-base and 0 otherwise. That tells the probe which of HH-RLHF's two splits a pair came from, which no
reward model is told; those rows bound what recognising the kind of request (a harmful one, where the
shorter, evasive answer tends to win, or a benign one, where the longer answer tends to win) could add.

    .venv/bin/python benchmarks/reward_probe.py

The last stdout line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf"
EVAL_SHARE = 0.2  # as reward_training.split_files
FEATURE_SETS = {
    "length": ("length",),
    "relevance": ("relevance",),
    "length + relevance": ("length", "relevance"),
    "embedding": ("embedding",),
    "embedding + length + relevance": ("embedding", "length", "relevance"),
    "embedding + length + relevance, weighted by the question": (
        "embedding", "length", "relevance", "length x question", "relevance x question"),
}


@dataclass
class Pair:
    source: str  # the file it came from
    held_out: bool
    question: str  # the last user turn
    chosen: str  # the final answers
    rejected: str


def load_pairs(data_dir: Path, eval_share: float = EVAL_SHARE) -> list[Pair]:
    """Every usable pair of every *.jsonl.gz in `data_dir`, held out by the hash of file:line that
    reward_training.split_files uses."""
    from pipelines.reward.datasets import parse_hh, read_jsonl, split_value

    pairs = []
    for path in sorted(data_dir.glob("*.jsonl.gz")):
        for i, row in enumerate(read_jsonl(path)):
            try:
                messages, chosen = parse_hh(row["chosen"])
                _, rejected = parse_hh(row["rejected"])
            except (ValueError, KeyError, TypeError):
                continue
            users = [m["content"] for m in messages if m["role"] == "user"]
            if chosen == rejected or not users:
                continue
            pairs.append(Pair(path.name, split_value(f"{path.name}:{i}") < eval_share, users[-1], chosen,
                              rejected))
    if not pairs:
        raise FileNotFoundError(f"no usable pairs in {data_dir}/*.jsonl.gz")
    return pairs


def embed(texts: list[str], backbone: Path, max_length: int, batch_size: int = 64):
    """(L2-normalised mean-pooled last hidden states [n, hidden], token counts [n]) of `texts`."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from alignloop.reward_model import pool

    tokenizer = AutoTokenizer.from_pretrained(str(backbone))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # float32 whatever the folder was saved in (the policy's is bf16): the features are what is measured.
    model = AutoModel.from_pretrained(str(backbone), dtype=torch.float32).eval()
    vectors = torch.zeros(len(texts), model.config.hidden_size)
    lengths = torch.zeros(len(texts))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of similar length pad little
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            pooled = pool(out, enc["attention_mask"], "mean")
            vectors[rows] = torch.nn.functional.normalize(pooled, dim=-1)
            lengths[rows] = enc["attention_mask"].sum(1).to(lengths.dtype)
    return vectors, lengths


def fit_pairwise(diff, train_mask, l2: float, steps: int = 200):
    """w minimising mean −log σ(diff·w) over the training rows + l2·|w|² (L-BFGS); returns w."""
    import torch

    x = diff[train_mask]
    w = torch.zeros(diff.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = -torch.nn.functional.logsigmoid(x @ w).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def accuracy(margins, mask) -> float | None:
    """Share of the rows in `mask` with a positive margin (a tie is wrong, as in the RM's held-out
    accuracy); None when `mask` holds no row (JSON has no NaN)."""
    return round(float((margins[mask] > 0).float().mean()), 4) if bool(mask.any()) else None


def probe(pairs: list[Pair], backbone: Path, max_length: int, l2: float) -> list[dict]:
    """Held-out accuracies (all, and per source file) of every feature set, without and with the split."""
    import torch

    held_out = torch.tensor([p.held_out for p in pairs])
    if held_out.all() or not held_out.any():
        raise ValueError(f"the split leaves nothing to {'train' if held_out.all() else 'score'} on")
    n = len(pairs)
    vectors, lengths = embed([p.question for p in pairs] + [p.chosen for p in pairs]
                             + [p.rejected for p in pairs], backbone, max_length)
    question, answers, n_tokens = vectors[:n], (vectors[n:2 * n], vectors[2 * n:]), (lengths[n:2 * n],
                                                                                      lengths[2 * n:])

    def features(side: int) -> dict:
        length = torch.log1p(n_tokens[side]).unsqueeze(1)
        relevance = (question * answers[side]).sum(1, keepdim=True)
        return {"length": length, "relevance": relevance, "embedding": answers[side],
                "length x question": length * question, "relevance x question": relevance * question}

    chosen, rejected = features(0), features(1)
    sources = sorted({p.source for p in pairs})
    helpful = torch.tensor([p.source.startswith("helpful") for p in pairs], dtype=torch.float32).unsqueeze(1)
    rows = []
    for name, parts in FEATURE_SETS.items():
        diff = torch.cat([chosen[k] - rejected[k] for k in parts], 1)
        for with_split in (False, True):
            x = torch.cat([diff, diff * helpful], 1) if with_split else diff
            margins = x @ fit_pairwise(x, ~held_out, l2)
            row = {"features": name, "with_split": with_split,
                   "eval_accuracy": accuracy(margins, held_out)}
            for source in sources:
                mask = held_out & torch.tensor([p.source == source for p in pairs])
                row[source] = accuracy(margins, mask)
            rows.append(row)
    return rows


def percent(share: float | None) -> str:
    """A table cell: 0.5441 -> "54.4%", None (no pair) -> "-"."""
    return "-" if share is None else f"{100 * share:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="a folder of HH-RLHF *.jsonl.gz files")
    parser.add_argument("--backbone", type=Path,
                        help="a transformers folder (default: all-MiniLM-L6-v2 from its wheel)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per embedded text")
    parser.add_argument("--l2", type=float, default=1e-3, help="L2 weight of the probe")
    cli = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from alignloop.reward_model import DEFAULT_BACKBONE, default_backbone_path
    from pipelines.training import configure_threads

    hf_logging.set_verbosity_error()
    threads = configure_threads(None)
    backbone = cli.backbone or default_backbone_path()
    backbone_name = DEFAULT_BACKBONE if cli.backbone is None else backbone.name
    pairs = load_pairs(cli.data)
    console = Console(stderr=True)
    started = time.perf_counter()
    with console.status(f"embedding {3 * len(pairs)} texts with {backbone_name}"):
        rows = probe(pairs, backbone, cli.max_length, cli.l2)
    sources = sorted({p.source for p in pairs})
    held = sum(p.held_out for p in pairs)
    table = Table(title=f"frozen {backbone_name}: pairwise logistic probe, "
                        f"{len(pairs) - held} training pairs, {held} held out")
    for column in ("features", "split given", "held-out", *(s.split(".")[0] for s in sources)):
        table.add_column(column, justify="left" if column == "features" else "right")
    for r in rows:
        table.add_row(r["features"], "yes" if r["with_split"] else "no", percent(r["eval_accuracy"]),
                      *(percent(r[s]) for s in sources))
    Console().print(table)
    best = max((r for r in rows if not r["with_split"]), key=lambda r: r["eval_accuracy"])
    best_split = max((r for r in rows if r["with_split"]), key=lambda r: r["eval_accuracy"])
    print(json.dumps({"backbone": backbone_name, "threads": threads, "torch": torch.__version__,
                      "train_pairs": len(pairs) - held, "eval_pairs": held, "max_length": cli.max_length,
                      "l2": cli.l2, "seconds": round(time.perf_counter() - started, 1),
                      "best_eval_accuracy": best["eval_accuracy"], "best_features": best["features"],
                      "best_eval_accuracy_with_split": best_split["eval_accuracy"],
                      "best_features_with_split": best_split["features"], "rows": rows}))


if __name__ == "__main__":
    main()
