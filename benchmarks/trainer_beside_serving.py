"""A training job on the machine that serves: what the job's OpenMP wait policy costs the serving engine, and
what it costs the job.

The pipeline runner's LocalLauncher starts its steps (RM training, PPO) on the machine the stack serves from.
The policy service's engine lets its idle OpenMP threads sleep at once (`ALIGNLOOP_CPU_OMP_SPIN_COUNT=0`); a
job left at GNU OpenMP's default spins its idle threads for about 3 ms after every parallel region, holding
cores the engine waits for. This runs the policy service's engine (services/policy/engine.build_engine) in
this process and, beside it, a PPO job (pipelines.ppo.train with its in-process rollout engine, a rule-based
reward: the job's compute, not its learning, is what is measured) in a process of its own, under each policy:

  spin      the runtime's default (no OMP_WAIT_POLICY, no GOMP_SPINCOUNT)
  passive   OMP_WAIT_POLICY=PASSIVE: idle threads sleep at once

While the job runs, --concurrency greedy requests of --max-tokens tokens go to the engine, batch after batch.
Each round also serves alone for --alone-s seconds (the baseline). The settings take turns and swap order
each round. It prints, per setting, the job's time and the engine's tokens/s and TTFT p50 while the job ran,
the ratios passive/spin, and one JSON line.

    .venv/bin/python benchmarks/trainer_beside_serving.py               # SmolLM2-135M (about 25 minutes)
    .venv/bin/python benchmarks/trainer_beside_serving.py --model tiny  # the tiny random model
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.priorities import build, err, setup, shutdown  # noqa: E402
from benchmarks.serving import percentile  # noqa: E402
from benchmarks.serving_dtype import one  # noqa: E402

REQUEST_IDS = itertools.count()
SETTINGS = {"spin": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
JOB_PROMPTS = [[{"role": "user", "content": f"Tell me something about topic number {i}."}] for i in range(64)]


def letter_share(conversations, responses):
    """The job's reward: 10 × the share of an answer's characters that are ASCII letters."""
    return [10.0 * sum(c.isascii() and c.isalpha() for c in r) / max(1, len(r)) for r in responses]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="rounds per setting, alternating")
    p.add_argument("--iterations", type=int, default=2, help="PPO iterations of each job")
    p.add_argument("--alone-s", type=float, default=20.0, help="serving with no job beside it, each round")
    p.add_argument("--home", type=Path, default=None,
                   help="ALIGNLOOP_HOME, where vLLM keeps its sockets (default .alignloop)")
    p.add_argument("--child", metavar="OUT", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def job(args: argparse.Namespace) -> None:
    """The PPO job, in this (child) process: prints {"job_s"}."""
    from alignloop.config import Settings, vllm_cpu_environment
    from pipelines.ppo.args import Args
    from pipelines.ppo.rewards import FunctionReward
    from pipelines.ppo.train import Inputs, train

    _, folder, _ = setup(args, tiny_max_model_len=512)
    ppo_args = Args(iterations=args.iterations, prompts_per_iteration=8, samples_per_prompt=4,
                    max_new_tokens=16, ppo_epochs=1, minibatch_size=16, beta=0.01, max_model_len=256,
                    checkpoint_every=0, seed=0)
    inputs = Inputs(folder, folder, JOB_PROMPTS, FunctionReward(f"{__name__}:letter_share"))
    started = time.perf_counter()
    train(inputs, ppo_args, args.child, engine_env=vllm_cpu_environment(Settings(home=args.child / "home")))
    print(json.dumps({"job_s": round(time.perf_counter() - started, 2)}))


def start_job(setting: str, out: Path, args: argparse.Namespace) -> subprocess.Popen:
    """The PPO job under `setting`, in a process of its own; its output goes to `out`.log, which ends with
    its JSON line (not a pipe: its logs would fill one and stall it)."""
    argv = [sys.executable, __file__, "--model", args.model, "--iterations", str(args.iterations),
            "--child", str(out)]
    # Nothing of this process's OpenMP or vLLM settings (build_engine set the serving engine's here).
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
           and not k.startswith(("VLLM_", "TORCHINDUCTOR_"))}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".log"), "w") as log:
        return subprocess.Popen(argv, env=env | SETTINGS[setting], stdout=log, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parents[1])


async def serve_while(engine, prompts: list[list[int]], args: argparse.Namespace, busy) -> dict:
    """Batches of requests on `engine` for as long as `busy()` says: tokens/s and every request's TTFT."""
    tokens, ttfts, started = 0, [], time.perf_counter()
    while busy():
        done = await asyncio.gather(*(one(engine, prompt, args.max_tokens, f"r{next(REQUEST_IDS)}")
                                      for prompt in prompts))
        tokens += sum(t for t, _ in done)
        ttfts += [ttft for _, ttft in done]
    return {"tokens": tokens, "seconds": time.perf_counter() - started, "ttfts": ttfts}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        job(args)
        return
    settings, folder, tokenizer = setup(args, tiny_max_model_len=512)
    chats = [[{"role": "user", "content": f"Describe the number {i} in two sentences."}]
             for i in range(args.concurrency)]
    texts = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    runs = settings.home / "bench" / "trainer-beside-serving"

    async def run() -> dict[str, list[dict]]:
        engines = [build("serving", settings, folder)]
        results: dict[str, list[dict]] = {name: [] for name in (*SETTINGS, "alone")}
        try:
            deadline = time.perf_counter() + 2
            await serve_while(engines[0], prompts, args, lambda: time.perf_counter() < deadline)  # warm-up
            for round_no in range(args.rounds):
                deadline = time.perf_counter() + args.alone_s
                with err.status(f"round {round_no + 1}: serving alone"):
                    results["alone"].append(await serve_while(
                        engines[0], prompts, args, lambda: time.perf_counter() < deadline))
                for name in SETTINGS if round_no % 2 == 0 else reversed(SETTINGS):
                    proc = start_job(name, runs / f"{name}-{round_no}", args)
                    with err.status(f"round {round_no + 1}: serving beside the {name} job"):
                        served = await serve_while(engines[0], prompts, args, lambda: proc.poll() is None)
                    log = (runs / f"{name}-{round_no}.log").read_text()
                    if proc.wait() != 0:
                        raise SystemExit(f"the {name} job failed\n{log[-3000:]}")
                    served["job_s"] = next(json.loads(line)["job_s"] for line in reversed(log.splitlines())
                                           if line.startswith('{"job_s"'))
                    results[name].append(served)
                    err.print(f"round {round_no + 1} {name:<7}: job {served['job_s']:.1f} s; engine "
                              f"{served['tokens'] / served['seconds']:.1f} tokens/s, "
                              f"TTFT p50 {percentile(served['ttfts'], 50) * 1e3:.0f} ms")
            return results
        finally:
            shutdown(engines)

    results = asyncio.run(run())

    def rate(name: str) -> float:
        return sum(r["tokens"] for r in results[name]) / sum(r["seconds"] for r in results[name])

    def ttft_ms(name: str) -> float:
        return percentile([t for r in results[name] for t in r["ttfts"]], 50) * 1e3

    summary = {"model": args.model, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
               "rounds": args.rounds, "iterations": args.iterations,
               "alone_tokens_per_s": round(rate("alone"), 1), "alone_ttft_p50_ms": round(ttft_ms("alone"), 1)}
    for name in SETTINGS:
        summary |= {f"{name}_job_s": round(statistics.median(r["job_s"] for r in results[name]), 1),
                    f"{name}_tokens_per_s": round(rate(name), 1),
                    f"{name}_ttft_p50_ms": round(ttft_ms(name), 1)}
    summary |= {"job_s_ratio_passive_over_spin": round(summary["passive_job_s"] / summary["spin_job_s"], 3),
                "tokens_per_s_ratio_passive_over_spin": round(rate("passive") / rate("spin"), 3)}
    for name in SETTINGS:
        err.print(f"{name:<7}: job {summary[f'{name}_job_s']:.1f} s, engine "
                  f"{summary[f'{name}_tokens_per_s']:.1f} tokens/s "
                  f"(alone {summary['alone_tokens_per_s']:.1f}), TTFT p50 {summary[f'{name}_ttft_p50_ms']:.0f} ms")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
