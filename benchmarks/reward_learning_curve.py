"""Reward-model learning curve: held-out accuracy against the number of training pairs, on HH-RLHF.

How much feedback must an application collect before a retrained RM is worth promoting? This trains
alignloop's RM (pipelines.reward.train, the default backbone unless --backbone) on nested prefixes of the same
training split (--sizes, each run from the backbone afresh) and scores every one on the same held-out pairs.
The split is reward_training.py's: every pair of ../shared/data/hh-rlhf goes to train or held-out by a hash of
file:line (20% held out), each side shuffled once, so a smaller prefix is part of every larger one.

It then fits accuracy = a + b · log2(pairs), the usual shape of such curves over a decade of data, and prints
the slope per doubling and, for --target, how many pairs the fit would need: an extrapolation beyond the data
this machine has, with the slope's standard error to show how loose it is. Each accuracy is also given with
its binomial standard error (about 1.6 points on 908 held-out pairs), which is as large as the steps between
neighbouring sizes. The last stdout line is a JSON object.

    .venv/bin/python benchmarks/reward_learning_curve.py --sizes 500,1000,2000,5000   # 5000: all 3,756
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_sibling(name: str):
    """Another benchmark script of this folder, as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def binomial_se(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on n independent pairs."""
    return math.sqrt(accuracy * (1 - accuracy) / n) if n else float("nan")


def fit_log2(pairs: list[int], accuracy: list[float], target: float) -> dict:
    """Least-squares fit of accuracy = a + b · log2(pairs). Returns the intercept, the slope per doubling and
    its standard error, and the pairs at which the line reaches `target` (None when the slope is not
    positive: the curve then says nothing about reaching it). Needs at least three sizes for an error."""
    from scipy import stats

    if len(set(pairs)) < 2:
        raise ValueError("a learning curve needs at least two training-set sizes")
    x = [math.log2(p) for p in pairs]
    fit = stats.linregress(x, accuracy)
    slope_se = fit.stderr if len(pairs) > 2 else None
    needed = 2 ** ((target - fit.intercept) / fit.slope) if fit.slope > 0 else None
    return {"intercept": fit.intercept, "slope_per_doubling": fit.slope, "slope_per_doubling_se": slope_se,
            "target": target, "pairs_for_target": needed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hh-rlhf",
                        help="a folder of HH-RLHF *.jsonl.gz files")
    parser.add_argument("--sizes", default="500,1000,2000,5000",
                        help="training-set sizes in pairs, comma-separated (past the split's end: all of it)")
    parser.add_argument("--eval-pairs", type=int, default=5000, help="held-out pairs (default: all)")
    parser.add_argument("--backbone", help="a transformers folder (default: all-MiniLM-L6-v2 from its wheel)")
    # The settings of the README's best held-out accuracy with MiniLM (one epoch: a second overfits).
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.63, help="the held-out accuracy to extrapolate to")
    cli = parser.parse_args()
    sizes = sorted({int(s) for s in cli.sizes.split(",") if s.strip()})

    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from alignloop.config import Settings
    from pipelines.reward.datasets import load_hh
    from pipelines.reward.train import Args, run

    console = Console(stderr=True)
    hf_logging.disable_progress_bar()
    split_files = load_sibling("reward_training").split_files
    hyper = Args(backbone=cli.backbone, lr=cli.lr, batch_size=cli.batch_size, epochs=cli.epochs,
                 max_length=cli.max_length, seed=cli.seed, pointwise_weight=0.0)
    points = []
    with tempfile.TemporaryDirectory(prefix="reward-curve-") as tmp:
        tmp = Path(tmp)
        train_file, eval_file, _ = split_files(cli.data, tmp)
        for size in sizes:
            data = load_hh([train_file], [eval_file], limit=size, eval_limit=cli.eval_pairs)
            if points and data.train_pairs == points[-1]["train_pairs"]:
                continue  # past the end of the split: the same run again
            console.rule(f"{data.train_pairs} training pairs")
            summary = run(Settings(home=tmp / "home"), data, hyper, register=False, console=console)
            points.append({"train_pairs": data.train_pairs, "eval_pairs": data.eval_pairs,
                           "eval_accuracy": summary["eval_accuracy"],
                           "eval_accuracy_se": binomial_se(summary["eval_accuracy"], data.eval_pairs),
                           "pairs_per_s": summary["pairs_per_s"], "train_seconds": summary["train_seconds"]})
            console.print(f"{data.train_pairs:,} pairs: held-out accuracy {summary['eval_accuracy']:.1%} "
                          f"± {points[-1]['eval_accuracy_se']:.1%}, {summary['pairs_per_s']:.2f} pairs/s")

    table = Table(title=f"held-out accuracy by training pairs ({points[0]['eval_pairs']} held out)")
    for col in ("training pairs", "held-out accuracy", "± 1 s.e.", "pairs/s"):
        table.add_column(col, justify="right")
    for p in points:
        table.add_row(f"{p['train_pairs']:,}", f"{p['eval_accuracy']:.1%}", f"{p['eval_accuracy_se']:.1%}",
                      f"{p['pairs_per_s']:.2f}")
    Console().print(table)
    result = {"points": points, "hyper": {"lr": cli.lr, "batch_size": cli.batch_size, "epochs": cli.epochs,
                                          "max_length": cli.max_length, "seed": cli.seed},
              "backbone": cli.backbone or "all-MiniLM-L6-v2"}
    if len(points) >= 2:
        fit = fit_log2([p["train_pairs"] for p in points], [p["eval_accuracy"] for p in points], cli.target)
        se = fit["slope_per_doubling_se"]
        needed = fit["pairs_for_target"]
        Console().print(
            f"fit: {fit['slope_per_doubling']:+.1%} per doubling of the training pairs"
            + ("" if se is None else f" (± {se:.1%})")
            + (f"; {cli.target:.0%} would take about {needed:,.0f} pairs at that slope" if needed else
               f"; the slope is not positive, so it does not reach {cli.target:.0%}"))
        result["fit"] = fit
    print(json.dumps(result))


if __name__ == "__main__":
    main()
