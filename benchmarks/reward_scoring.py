"""Reward scoring: scores/s through the reward service (gRPC, concurrent clients) vs RewardModel.score here.

Both score the same registered model version on the same inputs, in the same run:

  grpc         --clients concurrent clients send Score calls of --per-call items each, over one channel, to
               the reward service (a real process: tests/integration/reward_stack.py), which batches them
               dynamically (up to --max-batch items per forward pass, waiting at most --max-wait-ms)
  in-process   RewardModel.score(tokenizer, texts) in this process, batch_size 32 (its default), the texts in
               their given order: what a trainer would do without the service
  in-process, sorted   the same, with the texts sorted by length first (what the service does inside a batch)

The inputs are HH-style conversations of varied lengths (seeded). The service process and this one share the
machine, so phases run one after another, --rounds times, alternating; the best round of each is reported
(other users of a shared machine only ever slow a round down). Both sides use --threads torch threads
(default 1: with 2 threads on a 2-core machine that others also use, a forward pass can get 10× slower while
its threads wait for each other). The scores of the two paths are compared too.

    .venv/bin/python benchmarks/reward_scoring.py            # all-MiniLM-L6-v2 with a fresh head
    .venv/bin/python benchmarks/reward_scoring.py --tiny     # the tiny random BERT: a quick check

The last line on stdout is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script: `alignloop`, `services` and `tests` importable

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from alignloop.reward_model import render  # noqa: E402
from benchmarks.serving import percentile  # noqa: E402

err = Console(stderr=True)
out = Console(soft_wrap=True)

WORDS = ("the model reads a prompt and writes an answer people rate answers reward learns their "
         "preferences policy value token feedback quick brown fox jumps over lazy dog capital of France is "
         "Paris two plus two is four please explain briefly and politely").split()


def conversations(n: int, seed: int = 0) -> list[tuple[list[dict[str, str]], str]]:
    """Seeded (messages, response) pairs: 1-3 turns, prompts of 5-60 words, responses of 5-120 words."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    pairs = []
    for _ in range(n):
        messages = [{"role": "user", "content": text(5, 60)}]
        for _ in range(rng.randint(0, 2) // 2):
            messages += [{"role": "assistant", "content": text(5, 40)},
                         {"role": "user", "content": text(3, 20)}]
        pairs.append((messages, text(5, 120)))
    return pairs


async def run_grpc(target: str, requests: list, clients: int) -> tuple[float, list[float], list[float]]:
    """(seconds, call latencies, rewards in request order)."""
    import grpc

    from alignloop.v1 import reward_pb2_grpc as pb_grpc

    results: list = [None] * len(requests)
    latencies: list[float] = []
    next_index = iter(range(len(requests)))

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RewardServiceStub(channel)

        async def client() -> None:
            for i in next_index:
                t = time.perf_counter()
                results[i] = (await stub.Score(requests[i], timeout=600)).rewards
                latencies.append(time.perf_counter() - t)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        seconds = time.perf_counter() - started
    return seconds, latencies, [r for rewards in results for r in rewards]


def run_in_process(model, tokenizer, texts: list[str], *, sort: bool) -> tuple[float, list[float]]:
    started = time.perf_counter()
    scores = model.score(tokenizer, texts, sort_by_length=sort)
    return time.perf_counter() - started, scores


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from alignloop.v1 import policy_pb2
    from alignloop.v1 import reward_pb2 as pb
    from tests.integration.reward_stack import RewardStack, reward_settings

    pairs = conversations(args.items, seed=args.seed)
    texts = [render(m, r) for m, r in pairs]
    requests = [
        pb.ScoreRequest(items=[
            pb.ScoreItem(messages=[policy_pb2.ChatMessage(**m) for m in msgs], response=resp)
            for msgs, resp in pairs[i:i + args.per_call]
        ])
        for i in range(0, len(pairs), args.per_call)
    ]
    model_name = "tiny random BERT" if args.tiny else "all-MiniLM-L6-v2"
    home = Path(tempfile.mkdtemp(prefix="alignloop-bench-reward-"))
    settings = reward_settings(home, reward_max_batch=args.max_batch, reward_max_wait_ms=args.max_wait_ms,
                               reward_max_items=max(256, args.per_call), reward_poll_s=3600,
                               reward_threads=args.threads)
    stack = RewardStack(settings)
    rows: dict[str, list[float]] = {"grpc": [], "in-process": [], "in-process, sorted": []}
    latencies: list[float] = []
    try:
        err.print(f"starting MLflow and the reward service ({model_name}) in {home}")
        stack.up(tiny=args.tiny)
        version = stack.info().model.version
        model, tokenizer = stack.in_process(version)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        batches_before = _batches(stack)

        # Warm-up, not reported: first calls pay for lazy initialisation on both sides.
        warm = min(len(requests), 2 * args.clients)
        asyncio.run(run_grpc(stack.target, requests[:warm], args.clients))
        model.score(tokenizer, texts[:32])
        batches_before = _batches(stack)

        grpc_scores: list[float] = []
        local_scores: list[float] = []
        for round_no in range(1, args.rounds + 1):
            seconds, lat, grpc_scores = asyncio.run(run_grpc(stack.target, requests, args.clients))
            rows["grpc"].append(len(texts) / seconds)
            latencies += lat
            seconds, local_scores = run_in_process(model, tokenizer, texts, sort=False)
            rows["in-process"].append(len(texts) / seconds)
            seconds, _ = run_in_process(model, tokenizer, texts, sort=True)
            rows["in-process, sorted"].append(len(texts) / seconds)
            err.print(f"round {round_no}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in rows.items()))
        forwards, items = (a - b for a, b in zip(_batches(stack), batches_before))
    finally:
        stack.down()

    best = {k: max(v) for k, v in rows.items()}
    max_diff = max(abs(a - b) for a, b in zip(grpc_scores, local_scores))
    result = {
        "benchmark": "reward_scoring",
        "model": model_name,
        "items": len(texts),
        "clients": args.clients,
        "items_per_call": args.per_call,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "rounds": args.rounds,
        "threads": args.threads,
        "grpc_scores_per_s": round(best["grpc"], 1),
        "in_process_scores_per_s": round(best["in-process"], 1),
        "in_process_sorted_scores_per_s": round(best["in-process, sorted"], 1),
        "ratio_grpc_vs_in_process": round(best["grpc"] / best["in-process"], 3),
        "ratio_grpc_vs_in_process_sorted": round(best["grpc"] / best["in-process, sorted"], 3),
        "call_latency_p50_ms": round(1000 * percentile(latencies, 50), 1),
        "call_latency_p95_ms": round(1000 * percentile(latencies, 95), 1),
        "mean_batch_size": round(items / forwards, 1) if forwards else None,
        "max_abs_score_diff": max_diff,
    }

    table = Table(title=f"reward scoring, {model_name}: {len(texts)} items, {args.clients} clients × "
                        f"{args.per_call} items/call, best of {args.rounds}")
    for col in ("path", "scores/s", "vs in-process", "rounds"):
        table.add_column(col, justify="right" if col != "path" else "left")
    for name, values in rows.items():
        table.add_row(name, f"{best[name]:.1f}", f"{best[name] / best['in-process']:.2f}×",
                      ", ".join(f"{v:.1f}" for v in values))
    out.print(table)
    out.print(f"gRPC call latency p50 {result['call_latency_p50_ms']} ms, "
              f"p95 {result['call_latency_p95_ms']} ms; mean batch {result['mean_batch_size']} items; "
              f"scores differ by at most {max_diff:.2e}")
    out.print(f"ratio gRPC / in-process: {result['ratio_grpc_vs_in_process']:.2f}× "
              f"(/ in-process sorted: {result['ratio_grpc_vs_in_process_sorted']:.2f}×)")
    print(json.dumps(result))


def _batches(stack) -> tuple[float, float]:
    m = stack.metrics()
    return m[("alignloop_reward_batch_size_count", ())], m[("alignloop_reward_batch_size_sum", ())]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny random BERT instead of MiniLM (seconds)")
    p.add_argument("--items", type=int, default=None, help="items per round (default 192; 2048 with --tiny)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--per-call", type=int, default=1, help="items per Score call")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, in the service and in-process alike (0: torch's default). 1 by "
                        "default: on a small shared machine, spare threads spin waiting for busy cores")
    args = p.parse_args(argv)
    if args.items is None:
        args.items = 2048 if args.tiny else 192
    return args


if __name__ == "__main__":
    main()
