"""What a tenant's priority buys when the engine is full: an interactive tenant's time to first token and
latency while a batch tenant keeps the engine's queue full, with vLLM's first-come-first-served scheduling
(`fcfs`, the default) and with `ALIGNLOOP_SCHEDULING_POLICY=priority`, the batch tenant at priority 10 and the
interactive one at 0, as `alignloop keys priority` would set them.

Both engines are built here with the policy service's build_engine and the same settings but the scheduling
policy, and run one after the other in alternating rounds (so a slow spell of the machine falls on both):

  batch         --batch-clients clients, each sending a --batch-tokens request as soon as its last one ended:
                more than the engine's --max-num-seqs places, so there is always a queue
  interactive   --interactive requests a round, one at a time, --interactive-tokens each, while the batch runs

It prints the interactive requests' TTFT and latency p50/p95 and the batch's tokens/s per policy, and the
ratios; the last stdout line is a JSON object.

    .venv/bin/python benchmarks/priorities.py                 # SmolLM2-135M
    .venv/bin/python benchmarks/priorities.py --model tiny    # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from alignloop.config import POLICY_MODEL_NAME, Settings  # noqa: E402
from benchmarks.ppo_step import policy_folder  # noqa: E402
from benchmarks.serving import percentile  # noqa: E402

POLICIES = ("fcfs", "priority")
BATCH_PRIORITY, INTERACTIVE_PRIORITY = 10, 0
err = Console(stderr=True)


def setup(args: argparse.Namespace, tiny_max_model_len: int, **overrides) -> tuple[Settings, Path, object]:
    """What a benchmark of engines in this process starts from: stdout kept for its JSON line, the settings
    (`overrides` on top; lighter ones with `--model tiny`; `--home`), the policy's folder and its tokenizer."""
    # vLLM logs to stdout by default.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    overrides = {"engine_stats": False, **overrides}
    if args.home is not None:
        overrides["home"] = args.home
    if args.model == "tiny":
        overrides |= {"max_model_len": tiny_max_model_len, "dtype": "float32", "enforce_eager": True}
    settings = Settings(**overrides)
    settings.ensure_dirs()
    folder = policy_folder(tiny=args.model == "tiny")
    from transformers import AutoTokenizer

    return settings, folder, AutoTokenizer.from_pretrained(str(folder))


def shutdown(engines: list) -> None:
    """Shuts the engines down and lets go of them. None may outlive the benchmark: at interpreter exit
    AsyncLLM.__del__ would shut it down again, on half-torn-down modules (TypeError)."""
    while engines:
        engine = engines.pop()
        with contextlib.suppress(Exception):
            engine.shutdown()
        del engine


def alternating(names: tuple[str, ...], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, name) for each round of each name; which goes first alternates, so that a slow spell of the
    machine falls on both and neither always follows the other."""
    for round_no in range(rounds):
        for name in names if round_no % 2 == 0 else names[::-1]:
            yield round_no, name


def build(name: str, settings: Settings, folder: Path, **overrides):
    """The policy service's engine, named `name` on the console, with `overrides` of the settings. (Built
    apart from Target: something in vLLM's start-up keeps this frame alive, and a Target in it would keep the
    engine until the interpreter exits, whose AsyncLLM.__del__ then fails on half-torn-down modules.)"""
    from services.policy.engine import build_engine

    with err.status(f"{name}: building the vLLM engine"):
        return build_engine(settings.model_copy(update=overrides), folder, served_name=POLICY_MODEL_NAME)


class Target:
    """One engine and the prompts it is fed, as the policy service feeds it (chat template, token ids)."""

    def __init__(self, policy: str, engine, tokenizer) -> None:
        self.engine = engine
        self.policy = policy
        self.tokenizer = tokenizer
        self.sent = 0

    def prompt(self, text: str) -> list[int]:
        chat = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer.encode(chat, add_special_tokens=False)

    async def request(self, text: str, max_tokens: int, priority: int) -> tuple[float, float, int]:
        """(time to first token, latency, tokens) of one greedy, fixed-length request."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from services.policy.engine import engine_input

        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        self.sent += 1
        start, ttft, tokens = time.perf_counter(), None, 0
        async for out in self.engine.generate(engine_input(self.engine, self.prompt(text)), params,
                                              f"{self.policy}-{self.sent}", priority=priority):
            tokens += len(out.outputs[0].token_ids)
            if ttft is None and tokens:
                ttft = time.perf_counter() - start
        return ttft, time.perf_counter() - start, tokens


async def run_round(target: Target, args: argparse.Namespace, round_no: int) -> dict:
    """The batch load and, once it fills the queue, the interactive requests one at a time."""
    batch_tokens = 0
    stop = asyncio.Event()

    async def batch_client(c: int) -> None:
        nonlocal batch_tokens
        k = 0
        while not stop.is_set():
            k += 1
            _, _, tokens = await target.request(f"Batch job {round_no}.{c}.{k}: summarise the report.",
                                                args.batch_tokens, BATCH_PRIORITY)
            if not stop.is_set():
                batch_tokens += tokens

    clients = [asyncio.create_task(batch_client(c)) for c in range(args.batch_clients)]
    await asyncio.sleep(args.warmup_s)  # every client has a request in, the queue is full
    started = time.perf_counter()
    interactive = []
    for i in range(args.interactive):
        interactive.append(await target.request(f"Question {round_no}.{i}: what is the capital of France?",
                                                args.interactive_tokens, INTERACTIVE_PRIORITY))
        await asyncio.sleep(args.gap_s)
    elapsed = time.perf_counter() - started
    stop.set()
    await asyncio.gather(*clients)  # each ends its request in flight (uncounted) and stops
    return {"ttft": [t for t, _, _ in interactive], "latency": [lat for _, lat, _ in interactive],
            "batch_tokens_per_s": batch_tokens / elapsed}


def report(results: dict[str, dict], args: argparse.Namespace) -> dict:
    table = Table(title=f"interactive requests (priority {INTERACTIVE_PRIORITY}) beside a batch tenant "
                        f"(priority {BATCH_PRIORITY}, {args.batch_clients} clients) on {args.max_num_seqs} places")
    for column in ("scheduling", "TTFT p50", "TTFT p95", "latency p50", "latency p95", "batch tokens/s"):
        table.add_column(column, justify="right" if column != "scheduling" else "left")
    summary: dict = {"model": args.model, "max_num_seqs": args.max_num_seqs, "batch_clients": args.batch_clients,
                     "rounds": args.rounds}
    for policy, r in results.items():
        row = {"ttft_p50_ms": 1000 * percentile(r["ttft"], 50), "ttft_p95_ms": 1000 * percentile(r["ttft"], 95),
               "latency_p50_ms": 1000 * percentile(r["latency"], 50),
               "latency_p95_ms": 1000 * percentile(r["latency"], 95),
               "batch_tokens_per_s": statistics.mean(r["batch_tokens_per_s"])}
        summary[policy] = row
        table.add_row(policy, *(f"{row[k]:,.0f} ms" for k in ("ttft_p50_ms", "ttft_p95_ms", "latency_p50_ms",
                                                               "latency_p95_ms")),
                      f"{row['batch_tokens_per_s']:,.1f}")
    fcfs, prio = summary["fcfs"], summary["priority"]
    summary["interactive_ttft_p50_ratio_fcfs_over_priority"] = fcfs["ttft_p50_ms"] / prio["ttft_p50_ms"]
    summary["interactive_latency_p50_ratio_fcfs_over_priority"] = fcfs["latency_p50_ms"] / prio["latency_p50_ms"]
    summary["batch_throughput_ratio_priority_over_fcfs"] = prio["batch_tokens_per_s"] / fcfs["batch_tokens_per_s"]
    err.print(table)
    err.print(f"interactive TTFT p50: {summary['interactive_ttft_p50_ratio_fcfs_over_priority']:.1f}× shorter "
              f"with priorities; latency p50 {summary['interactive_latency_p50_ratio_fcfs_over_priority']:.1f}×; "
              f"batch throughput {summary['batch_throughput_ratio_priority_over_fcfs']:.2f}× of fcfs's")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--max-num-seqs", type=int, default=4, help="the engine's batch: places before the queue")
    p.add_argument("--batch-clients", type=int, default=12)
    p.add_argument("--batch-tokens", type=int, default=64)
    p.add_argument("--interactive", type=int, default=10, help="interactive requests a round")
    p.add_argument("--interactive-tokens", type=int, default=16)
    p.add_argument("--gap-s", type=float, default=0.2, help="pause between interactive requests")
    p.add_argument("--warmup-s", type=float, default=2.0, help="batch load before the first interactive request")
    p.add_argument("--rounds", type=int, default=3, help="rounds per policy, alternating")
    p.add_argument("--home", type=Path, default=None,
                   help="ALIGNLOOP_HOME, where vLLM keeps its sockets (default .alignloop)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings, folder, tokenizer = setup(args, tiny_max_model_len=512, max_num_seqs=args.max_num_seqs)

    async def run() -> dict[str, dict]:
        targets = {policy: Target(policy, build(policy, settings, folder, scheduling_policy=policy), tokenizer) for policy in POLICIES}
        try:
            results = {p: {"ttft": [], "latency": [], "batch_tokens_per_s": []} for p in POLICIES}
            await run_round(targets["fcfs"], args, -1)  # warm-up (compilation, caches), not counted
            await run_round(targets["priority"], args, -1)
            for round_no, policy in alternating(POLICIES, args.rounds):
                with err.status(f"round {round_no + 1}/{args.rounds}: {policy}"):
                    r = await run_round(targets[policy], args, round_no)
                for key in ("ttft", "latency"):
                    results[policy][key] += r[key]
                results[policy]["batch_tokens_per_s"].append(r["batch_tokens_per_s"])
            return results
        finally:
            shutdown([targets.pop(policy).engine for policy in list(targets)])

    summary = report(asyncio.run(run()), args)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
