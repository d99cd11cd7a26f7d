"""What the policy service's engine front end spends per token with vLLM's environment variables read once
(`freeze_vllm_environment`, which build_engine calls) against read at every use, as vLLM's own API server reads
them.

vLLM reads some `VLLM_*` variables for every output it hands on (`envs.VLLM_COMPUTE_NANS_IN_LOGITS` in the
statistics of each token, for one): each read is an `os.getenv` and a conversion. Its engine core and workers
cache them once started; the front end, where the policy service's own code runs, does not.

One engine, the policy service's (build_engine, engine statistics on as in the service), in this process, so
this process's CPU time is the front end's: the engine core and the worker are processes of their own. Rounds of
--concurrency greedy requests of --max-tokens tokens at once, the cache on and off in turn (the order alternating
so that a slow spell of the machine falls on both). It prints the CPU microseconds per token of each setting,
the paired ratio, and one JSON line.

    .venv/bin/python benchmarks/engine_front_end.py --model tiny   # the front end's share is largest here
    .venv/bin/python benchmarks/engine_front_end.py                # SmolLM2-135M
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.priorities import alternating, build, err, setup, shutdown  # noqa: E402
from benchmarks.serving_dtype import one  # noqa: E402

SETTINGS = ("read each time", "read once")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10, help="rounds per setting, alternating")
    p.add_argument("--home", type=Path, default=None,
                   help="ALIGNLOOP_HOME, where vLLM keeps its sockets (default .alignloop)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings, folder, tokenizer = setup(args, tiny_max_model_len=512, engine_stats=True)

    def prompt(round_no: int, i: int) -> list[int]:
        text = f"Request {round_no}-{i}: describe the number {round_no * 1000 + i} in two sentences."
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer.encode(chat, add_special_tokens=False)

    frozen_by_build = []

    async def run() -> dict[str, list[float]]:
        from vllm import envs

        engines = [build("policy", settings, folder)]  # a list, so that shutdown() lets go of the last reference
        frozen_by_build.append(envs._is_envs_cache_enabled())
        try:
            await asyncio.gather(*(one(engines[0], prompt(-1, i), 8, f"warm-{i}") for i in range(4)))
            us_per_token: dict[str, list[float]] = {s: [] for s in SETTINGS}
            for round_no, setting in alternating(SETTINGS, args.rounds):
                (envs.enable_envs_cache if setting == "read once" else envs.disable_envs_cache)()
                with err.status(f"round {round_no + 1}/{args.rounds}: vLLM's environment {setting}"):
                    cpu = time.process_time()
                    done = await asyncio.gather(*(one(engines[0], prompt(round_no, i), args.max_tokens,
                                                      f"{round_no}-{setting}-{i}") for i in range(args.concurrency)))
                    tokens = sum(t for t, _ in done)
                    us_per_token[setting].append((time.process_time() - cpu) * 1e6 / tokens)
            return us_per_token
        finally:
            envs.enable_envs_cache()
            shutdown(engines)

    us = asyncio.run(run())
    pairs = [once / each for each, once in zip(us["read each time"], us["read once"])]
    summary = {
        "model": folder.name, "concurrency": args.concurrency, "max_tokens": args.max_tokens, "rounds": args.rounds,
        "read_each_time_us_per_token": round(statistics.median(us["read each time"]), 1),
        "read_once_us_per_token": round(statistics.median(us["read once"]), 1),
        # Geometric mean of the rounds' ratios: each pair ran back to back, so the machine's drift mostly cancels.
        "read_once_ratio_per_round_geomean": round(math.exp(statistics.fmean(math.log(r) for r in pairs)), 3),
        "rounds_read_once_cheaper": sum(r < 1 for r in pairs),
        "build_engine_reads_once": frozen_by_build[0],  # what the policy service runs with
    }
    for setting in SETTINGS:
        err.print(f"vLLM's environment {setting:14s} {statistics.median(us[setting]):6.1f} µs of front-end CPU "
                  f"per token (rounds: {' / '.join(f'{x:.0f}' for x in us[setting])})")
    err.print(f"read once / read each time: {summary['read_once_ratio_per_round_geomean']}× per round "
              f"(geometric mean), cheaper in {summary['rounds_read_once_cheaper']} of {args.rounds} rounds")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
