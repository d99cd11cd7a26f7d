"""`alignloop sft train`: supervised fine-tuning on demonstrations (InstructGPT §3.5, step 1).

Loss: the mean negative log-likelihood of the answer tokens, the prompt masked out (the model learns to
answer, not to write prompts), the answer ending with the chat template's end-of-turn token so the model
learns to stop. AdamW with linear warm-up and decay. The result is registered as a new `alignloop-policy`
version (tags: kind=sft, parent version, dataset hash) like any other; `--aliases champion,reference` makes it
the served model and PPO's KL reference, as InstructGPT's SFT model is.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console

from alignloop.config import Settings
from alignloop.console_progress import ProgressBar
from alignloop.prompt_split import content_hash
from pipelines import demonstrations as demos
from pipelines.ppo import core
from pipelines.ppo.models import demonstration_ids, load_policy, pack, pad_id, policy_forward, save_policy
from pipelines.sft.args import Args
from pipelines.training import linear_schedule, pick_device, seed_everything


def tokenize(tokenizer, conversations: list[demos.Conversation], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per demonstration; prompts cut on the left to fit `max_length`."""
    out = []
    for c in conversations:
        prompt, answer = demonstration_ids(tokenizer, c)
        answer = answer[:max_length - 1]
        prompt = prompt[-(max_length - len(answer)):]
        out.append((prompt, answer))
    return out


def train(policy, tokenizer, examples: list[tuple[list[int], list[int]]], args: Args, device: torch.device,
          console: Console, on_step=None) -> dict:
    seed_everything(args.seed)
    steps_per_epoch = math.ceil(len(examples) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup_ratio * total))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_schedule(s, total, warmup))
    rng = random.Random(args.seed)
    policy.train()
    step, tokens, last = 0, 0, None
    started = time.perf_counter()
    with ProgressBar(console, "SFT", total, unit=" steps") as bar:
        for _ in range(args.epochs):
            order = list(range(len(examples)))
            rng.shuffle(order)
            for start in range(0, len(order), args.batch_size):
                chunk = [examples[i] for i in order[start:start + args.batch_size]]
                batch = pack([p for p, _ in chunk], [a for _, a in chunk], pad_id(tokenizer)).to(device)
                logprobs, _ = policy_forward(policy, batch)
                loss = -core.masked_mean(logprobs, batch.response_mask)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                tokens += int(batch.response_mask.sum())
                last = loss.item()
                if on_step:
                    on_step(step, {"loss": last, "lr": scheduler.get_last_lr()[0]})
                bar.update(step, f"loss {last:.4f}")
    return {"steps": step, "final_loss": last, "answer_tokens": tokens,
            "train_seconds": round(time.perf_counter() - started, 3)}


def run(settings: Settings, conversations: list[demos.Conversation], args: Args, *, base: str = "@champion",
        aliases: tuple[str, ...] = (), register: bool = True, out: Path | None = None,
        source: str = "", console: Console | None = None) -> dict:
    """Fine-tunes `base` on `conversations`, saves it, and (with `register`) registers it."""
    from transformers import AutoTokenizer

    from pipelines.ppo.job import resolve_policy

    console = console or Console(stderr=True)
    if not conversations:
        raise ValueError("no demonstrations: no corrections or top-rated answers in the snapshot, and no --file")
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
    base_dir, base_ref = resolve_policy(settings, base)
    device = pick_device("auto")
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    policy = load_policy(base_dir).to(device)
    examples = tokenize(tokenizer, conversations, args.max_length)
    data_hash = content_hash(conversations)
    console.print(f"SFT on {base_dir.name} (version {base_ref.version if base_ref else 'folder'}): "
                  f"{len(examples)} demonstrations")
    tags = {"kind": "sft", "alignloop.kind": "sft", "alignloop.parent_policy_version":
            base_ref.version if base_ref else "", "alignloop.dataset_hash": data_hash,
            "alignloop.dataset_source": source[:5000], "alignloop.demonstrations": str(len(examples))}

    if not register:
        stats = train(policy, tokenizer, examples, args, device, console)
        folder = Path(out or settings.home / "runs" / f"sft-{data_hash[:12]}")
        save_policy(policy, tokenizer, folder, base_dir)
        return stats | {"model_version": None, "model_dir": str(folder), "dataset_hash": data_hash}

    import mlflow
    from mlflow import MlflowClient

    from pipelines.models_init import ensure_experiment, register_run_folder, tracking_uri

    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    experiment_id = ensure_experiment(client, "alignloop-sft")
    with tracking_uri(settings.tracking_uri), mlflow.start_run(experiment_id=experiment_id,
                          run_name=f"sft-{data_hash[:12]}", tags=tags) as active:
        mlflow.log_params(asdict(args) | {"base": base, "demonstrations": len(examples)})
        stats = train(policy, tokenizer, examples, args, device, console,
                      on_step=lambda s, m: mlflow.log_metrics(m, step=s, synchronous=False))
        mlflow.log_metrics({k: float(v) for k, v in stats.items() if isinstance(v, int | float)})
        with tempfile.TemporaryDirectory(dir=settings.cache_dir, prefix="sft-") as tmp:
            folder = Path(tmp) / "model"
            save_policy(policy, tokenizer, folder, base_dir)
            mv = register_run_folder(settings, settings.policy_model_name, active.info.run_id, folder, tags=tags,
                                     description="Policy fine-tuned on demonstrations by `alignloop sft train`.",
                                     model_description="The policy served to users.")
        for alias in aliases:
            if alias == "champion":  # through promotion, so `models rollback` can undo it
                from pipelines import promotion

                promotion.promote(settings, settings.policy_model_name, str(mv.version), reason="sft train")
            else:
                client.set_registered_model_alias(settings.policy_model_name, alias, mv.version)
        mlflow.flush_async_logging()
    console.print(f"{settings.policy_model_name} version {mv.version} registered"
                  + (f"; aliases {', '.join(aliases)}" if aliases else ""))
    return stats | {"model_version": str(mv.version), "run_id": active.info.run_id, "dataset_hash": data_hash,
                    "aliases": list(aliases)}
