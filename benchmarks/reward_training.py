"""Reward-model training: alignloop's trainer next to TRL's RewardTrainer, same backbone, data, tokens and
hyper-parameters, in the same run.

Data: HH-RLHF-format files (default ../shared/data/hh-rlhf, the helpful and harmless test splits). Every pair
goes to train or held-out by a hash of file:line (20% held out), then the first --train-pairs and
--eval-pairs of each side are used. Both trainers get the SAME token ids: the transcripts rendered by
alignloop.reward_model.render and tokenized once with the backbone's tokenizer (truncated on the left to
--max-length).

  ours  pipelines.reward.train ([CLS] state + linear head, one forward per distinct answer, length-sorted
        forward chunks), in this process.
  TRL   trl.RewardTrainer on AutoModelForSequenceClassification(num_labels=1) of the same backbone, fp32,
        no gradient checkpointing (TRL defaults to bf16 and checkpointing; both are turned off to match),
        dropout off (both, unless --keep-dropout), same lr, batch size in pairs, epochs, weight decay,
        warmup, linear decay, grad-norm clip and seed; in its own virtualenv (.alignloop/bench/trl-venv, made
        on first use: TRL needs accelerate and datasets, which the project's environment does not carry),
        which shares this environment's torch and transformers through a .pth file.

pairs/s: training pairs per second of the training loop (TRL: of `trainer.train()`), tokenization and
evaluation excluded. Held-out accuracy: share of pairs with r_chosen > r_rejected (a tie is wrong), computed
the same way for both; alignloop's also per HH-RLHF file (eval_accuracy_by_file). The last stdout line is a
JSON object.

    .venv/bin/python benchmarks/reward_training.py --train-pairs 1000 --eval-pairs 500
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf"
TRL_VENV = REPO / ".alignloop" / "bench" / "trl-venv"
TRL_PIN = "trl==1.16.0"


# ---- data ------------------------------------------------------------------------------------------------
def split_files(data_dir: Path, out: Path, eval_share: float = 0.2, seed: int = 0
                ) -> tuple[Path, Path, list[str]]:
    """Writes train.jsonl.gz and eval.jsonl.gz: every pair of every *.jsonl.gz in `data_dir`, held out by a
    hash of file:line, each side shuffled with `seed` so a prefix mixes the files. Also returns, for each line
    of eval.jsonl.gz, the name of the file it came from (held-out accuracy is reported per file too)."""
    from pipelines.reward.datasets import read_jsonl, split_value

    rows = [(f"{path.name}:{i}", row) for path in sorted(data_dir.glob("*.jsonl.gz"))
            for i, row in enumerate(read_jsonl(path))]
    if not rows:
        raise FileNotFoundError(f"no *.jsonl.gz in {data_dir}")
    random.Random(seed).shuffle(rows)
    paths = {"train": out / "train.jsonl.gz", "eval": out / "eval.jsonl.gz"}
    eval_sources = []
    for side, path in paths.items():
        with gzip.open(path, "wt", encoding="utf-8") as f:
            for key, row in rows:
                if (split_value(key) < eval_share) == (side == "eval"):
                    f.write(json.dumps(row) + "\n")
                    if side == "eval":
                        eval_sources.append(key.rsplit(":", 1)[0])
    return paths["train"], paths["eval"], eval_sources


def label_sources(groups: list, sources: list[str]) -> list:
    """`groups` of eval.jsonl.gz with each one's source set to the file its line came from, so that the
    trainer reports held-out accuracy per HH-RLHF file (the helpful and harmless splits disagree about what a
    good answer is, so their accuracies say more than their mean)."""
    # group ids are "eval.jsonl.gz:LINE"; a dropped line leaves a gap, so index by the line, not the position
    return [dataclasses.replace(g, source=sources[int(g.group_id.rsplit(":", 1)[1])]) for g in groups]


def token_pairs(groups, tokenizer, max_length: int) -> list[list[list[int]]]:
    """[chosen ids, rejected ids] per pair, tokenized as the trainer and the reward service do."""
    out = []
    for g in groups:
        enc = tokenizer(list(g.texts), truncation=True, max_length=max_length)["input_ids"]
        out.extend([enc[w], enc[lo]] for w, lo in g.pairs)
    return out


# ---- TRL, in its own virtualenv --------------------------------------------------------------------------
def ensure_trl_venv(venv: Path = TRL_VENV) -> Path:
    """The TRL virtualenv's python, made on first use (about 45 MB: trl, accelerate, datasets; everything
    else, torch and transformers included, comes from this environment through a .pth file, pinned by the
    lock)."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import trl"],
                                          capture_output=True).returncode == 0:
        return python
    import site
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = site.getsitepackages()[0] if site.getsitepackages() else sysconfig.get_paths()["purelib"]
    Path(purelib, "alignloop-venv.pth").write_text(ours + "\n")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        # The lock's versions for everything shared; torch's local version (+cpu) is what is installed anyway.
        lock = (REPO / "requirements" / "lock-cpu.txt").read_text().splitlines()
        constraints.write("\n".join(line for line in lock if not line.startswith("torch==")) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", TRL_PIN, "-c", constraints.name], check=True)
    os.unlink(constraints.name)
    return python


def trl_worker(job_path: Path) -> None:
    """Runs inside the TRL virtualenv: trains with trl.RewardTrainer on the job's token ids, prints JSON."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    job = json.loads(job_path.read_text())
    h = job["hyper"]
    torch.set_num_threads(job["threads"])
    torch.manual_seed(h["seed"])
    tokenizer = AutoTokenizer.from_pretrained(job["backbone"])
    model = AutoModelForSequenceClassification.from_pretrained(job["backbone"], num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    train = Dataset.from_dict({"chosen_ids": [c for c, _ in job["train"]],
                               "rejected_ids": [r for _, r in job["train"]]})
    steps = -(-len(job["train"]) // h["batch_size"]) * h["epochs"]
    config = RewardConfig(
        output_dir=job["output_dir"], per_device_train_batch_size=h["batch_size"],
        num_train_epochs=h["epochs"],
        learning_rate=h["lr"], weight_decay=h["weight_decay"], adam_beta1=h["adam_betas"][0],
        adam_beta2=h["adam_betas"][1], adam_epsilon=h["adam_eps"], lr_scheduler_type="linear",
        warmup_steps=max(1, round(h["warmup_ratio"] * steps)) if h["warmup_ratio"] > 0 else 0,
        max_grad_norm=h["max_grad_norm"], seed=h["seed"], data_seed=h["seed"],
        disable_dropout=h["disable_dropout"],
        max_length=None,  # already truncated, the same way as ours
        bf16=False, gradient_checkpointing=False, save_strategy="no", eval_strategy="no", report_to="none",
        logging_steps=max(1, steps // 10), dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
    )
    trainer = RewardTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started

    model = trainer.model.eval()
    device = next(model.parameters()).device
    flat = [ids for pair in job["eval"] for ids in pair]
    order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
    scores = [0.0] * len(flat)
    with torch.inference_mode():
        for start in range(0, len(order), 32):
            idx = order[start:start + 32]
            batch = tokenizer.pad({"input_ids": [flat[i] for i in idx]}, return_tensors="pt").to(device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for i, s in zip(idx, logits.squeeze(-1).float().tolist(), strict=True):
                scores[i] = s
    right = sum(scores[2 * k] > scores[2 * k + 1] for k in range(len(job["eval"])))
    print(json.dumps({"pairs_per_s": len(job["train"]) * h["epochs"] / seconds, "train_seconds": seconds,
                      "eval_accuracy": right / len(job["eval"]) if job["eval"] else None}))


# ---- the comparison --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="a folder of HH-RLHF *.jsonl.gz files")
    parser.add_argument("--train-pairs", type=int, default=1000)
    parser.add_argument("--eval-pairs", type=int, default=500)
    parser.add_argument("--backbone", help="a transformers folder (default: all-MiniLM-L6-v2 from its wheel)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--head-lr", type=float,
                        help="alignloop's scalar head (default: --lr; TRL has one rate)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (both trainers)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--keep-dropout", action="store_true",
                        help="train with the backbone's dropout (both trainers; default: off, as TRL)")
    parser.add_argument("--freeze-layers", type=int, default=0,
                        help="alignloop's trainer only (with --skip-trl): keep the embeddings and the "
                             "first N blocks as pretrained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-trl", action="store_true", help="measure alignloop's trainer alone")
    parser.add_argument("--trl-worker", type=Path, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.freeze_layers and not cli.skip_trl:
        parser.error("--freeze-layers has no TRL counterpart: add --skip-trl")
    if cli.trl_worker:
        trl_worker(cli.trl_worker)
        return

    import torch
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from alignloop.config import Settings
    from alignloop.reward_model import DEFAULT_BACKBONE, RewardModel, default_backbone_path
    from pipelines.reward.datasets import load_hh
    from pipelines.reward.train import Args, configure_threads, run

    console = Console(stderr=True)
    hf_logging.disable_progress_bar()
    backbone = cli.backbone or str(default_backbone_path())
    hyper = Args(backbone=backbone, lr=cli.lr, head_lr=cli.head_lr, batch_size=cli.batch_size,
                 epochs=cli.epochs, max_length=cli.max_length, seed=cli.seed, pointwise_weight=0.0,
                 disable_dropout=not cli.keep_dropout, freeze_layers=cli.freeze_layers)
    threads = configure_threads(None)
    backbone_name = Path(cli.backbone).name if cli.backbone else DEFAULT_BACKBONE
    result: dict = {"train_pairs": None, "eval_pairs": None, "backbone": backbone_name,
                    "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": threads,
                    "hyper": {k: getattr(hyper, k) for k in ("lr", "head_lr", "batch_size", "epochs",
                                                            "max_length", "weight_decay", "warmup_ratio",
                                                            "seed", "disable_dropout", "freeze_layers")},
                    "loadavg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="reward-bench-") as tmp:
        tmp = Path(tmp)
        train_file, eval_file, eval_sources = split_files(cli.data, tmp)
        data = load_hh([train_file], [eval_file], limit=cli.train_pairs, eval_limit=cli.eval_pairs)
        data = dataclasses.replace(data, eval_groups=label_sources(data.eval_groups, eval_sources))
        result.update(train_pairs=data.train_pairs, eval_pairs=data.eval_pairs)

        trl = None
        if not cli.skip_trl:
            python = ensure_trl_venv()
            _, tokenizer = RewardModel.from_backbone(backbone)
            max_length = min(cli.max_length, tokenizer.model_max_length)
            job = {"backbone": backbone, "threads": threads, "hyper": vars(hyper),
                   "train": token_pairs(data.train_groups, tokenizer, max_length),
                   "eval": token_pairs(data.eval_groups, tokenizer, max_length),
                   "output_dir": str(tmp / "trl")}
            (tmp / "job.json").write_text(json.dumps(job))
            console.print(f"TRL RewardTrainer: {data.train_pairs} pairs, then {data.eval_pairs} held out")
            done = subprocess.run([str(python), __file__, "--trl-worker", str(tmp / "job.json")],
                                  stdout=subprocess.PIPE, text=True, check=True,
                                  env=os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
            trl = json.loads(done.stdout.strip().splitlines()[-1])

        console.print(f"alignloop: {data.train_pairs} pairs, then {data.eval_pairs} held out")
        ours = run(Settings(home=tmp / "home"), data, hyper, register=False, out=tmp / "ours",
                   console=console)

    result |= {"eval_accuracy_by_file": ours["eval_accuracy_by_source"],
               "pairs_per_s": ours["pairs_per_s"], "eval_accuracy": ours["eval_accuracy"],
               "train_seconds": ours["train_seconds"], "loadavg_end": os.getloadavg()[0]}
    if trl:
        result |= {"trl_pairs_per_s": round(trl["pairs_per_s"], 3), "trl_eval_accuracy": trl["eval_accuracy"],
                   "trl_train_seconds": round(trl["train_seconds"], 3),
                   "pairs_per_s_ratio_vs_trl": round(ours["pairs_per_s"] / trl["pairs_per_s"], 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
