"""The engine alone under each OpenMP spin count: what `ALIGNLOOP_CPU_OMP_SPIN_COUNT` costs an engine that has
the machine to itself.

Serving engines let their idle OpenMP threads sleep at once (spin count 0), because the processes relaying
their tokens need the cores (benchmarks/serving.py measures that side). An engine with nothing beside it loses
by it: between two kernels a sleeping thread must be woken. Each setting runs in its own process, one after
another (two engines at once would compete for the cores, which is the effect being set aside here): the
raw vLLM engine (services/policy/engine.build_engine's arguments), 16 concurrent requests of --max-tokens
greedy tokens, a warm-up round and --rounds measured ones. It prints tokens/s per setting and the ratio to the
runtime's default; the last line is JSON.

    .venv/bin/python benchmarks/omp_spin.py                 # SmolLM2-135M (registered by serving.py's run)
    .venv/bin/python benchmarks/omp_spin.py --model tiny
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SPIN_COUNTS = (-1, 1000, 0)  # the runtime's default (300,000), a short spin, sleep at once (PASSIVE)


def measure(model: str, rounds: int, max_tokens: int, concurrency: int) -> list[float]:
    """tokens/s of each measured round, for the raw engine under this process's environment."""
    from alignloop.config import POLICY_MODEL_NAME, Settings
    from services.policy.engine import build_engine, engine_input

    settings = Settings(home=REPO_ROOT / ".alignloop" / "bench" / model, bootstrap_model=model)
    model_dir = settings.models_dir / POLICY_MODEL_NAME / "v1"
    if not (model_dir / "config.json").exists():
        sys.exit(f"no model in {model_dir}: run benchmarks/serving.py --model {model} once (it registers it)")
    # Held in a list and popped at shutdown: an engine still referenced at interpreter exit is shut down again
    # by AsyncLLM.__del__ on half-torn-down modules (TypeError).
    holder = [build_engine(settings, model_dir, served_name=POLICY_MODEL_NAME)]
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)

    async def one(round_no: int, i: int) -> int:
        # Prompts differ per round, so no round reuses another's cached prefix.
        prompt = [1 + (i * 7 + round_no * 13 + j) % 200 for j in range(40)]
        tokens = 0
        async for out in holder[0].generate(engine_input(holder[0], prompt), params, f"spin-{round_no}-{i}"):
            tokens += len(out.outputs[0].token_ids)
        return tokens

    async def run() -> list[float]:
        rates = []
        for round_no in range(rounds + 1):
            started = time.perf_counter()
            tokens = sum(await asyncio.gather(*(one(round_no, i) for i in range(concurrency))))
            if round_no:  # round 0 warms up
                rates.append(tokens / (time.perf_counter() - started))
        return rates

    try:
        return asyncio.run(run())
    finally:
        holder.pop().shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child's single setting
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.model, args.rounds, args.max_tokens, args.concurrency)), flush=True)
        return

    results = {}
    for spin in SPIN_COUNTS:
        env = {**os.environ, "ALIGNLOOP_CPU_OMP_SPIN_COUNT": str(spin),
               "VLLM_LOGGING_STREAM": "ext://sys.stderr"}
        env.pop("GOMP_SPINCOUNT", None)  # build_engine sets it unless it is set already
        env.pop("OMP_WAIT_POLICY", None)
        out = subprocess.run([sys.executable, __file__, "--one", str(spin), "--model", args.model,
                              "--rounds", str(args.rounds), "--max-tokens", str(args.max_tokens),
                              "--concurrency", str(args.concurrency)],
                             env=env, check=True, stdout=subprocess.PIPE, text=True)
        rates = json.loads(out.stdout.strip().splitlines()[-1])
        results[spin] = {"rounds_tokens_per_s": [round(r, 1) for r in rates],
                         "tokens_per_s": round(sorted(rates)[len(rates) // 2], 1)}
        print(f"spin count {spin:>6} ({'runtime default' if spin < 0 else 'GOMP_SPINCOUNT'}): "
              f"median {results[spin]['tokens_per_s']} tokens/s, rounds {results[spin]['rounds_tokens_per_s']}",
              file=sys.stderr, flush=True)
    default = results[-1]["tokens_per_s"]
    summary = {"model": args.model, "settings": {str(k): v for k, v in results.items()},
               "ratio_vs_default": {str(k): round(v["tokens_per_s"] / default, 3) for k, v in results.items()}}
    for spin, ratio in summary["ratio_vs_default"].items():
        print(f"spin count {spin}: {ratio:.2f}× the runtime default's tokens/s")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
