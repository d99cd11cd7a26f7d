"""How long the policy service's engine takes to start, compiled, with vLLM's AOT compile cache (vLLM's
default with torch 2.10 and newer) and without it (`VLLM_USE_AOT_COMPILE=0`, what alignloop.config sets on
CPUs), and what each then serves.

On CPU, vLLM 0.32 writes its AOT cache but cannot read it back ("'function' object has no attribute
'finalize_loading'"), so every start compiles afresh. Without it vLLM compiles through torch's own cache
(TORCHINDUCTOR_CACHE_DIR), which later starts read.

Each start is a process of its own, as a restarted policy service is. Each setting gets an empty cache folder,
a cold start, then a warm start on what the cold one left; the settings take turns (cold, cold, warm, warm),
so a slow spell of the machine falls on both. Each start times build_engine, then runs --rounds rounds of
--concurrency greedy requests of --max-tokens tokens. It prints the start times, whether the warm start
compiled again, the warm starts' ratio, and one JSON line. The tokens/s after each start show that the engine
serves; run minutes apart, they cannot say which setting serves faster (benchmarks/README, "Engine starts",
has that comparison, with both engines in one process and their rounds alternating).

    .venv/bin/python benchmarks/engine_start.py                # SmolLM2-135M (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/engine_start.py --model tiny   # the tiny random model, still compiled
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.priorities import build, err, setup, shutdown  # noqa: E402
from benchmarks.serving_dtype import one  # noqa: E402

SETTINGS = {"aot": "1", "no-aot": "0"}  # name: VLLM_USE_AOT_COMPILE
RECOMPILED = "Compiling model again"  # vLLM's warning when a start cannot load its AOT cache


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="rounds of requests after each start")
    p.add_argument("--home", type=Path, default=None,
                   help="a folder for the settings' ALIGNLOOP_HOMEs (default: a temporary one)")
    p.add_argument("--child", nargs=2, metavar=("SETTING", "HOME"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> None:
    """One start in this process: prints {"start_s", "tokens_per_s"}."""
    setting, home = args.child
    os.environ["VLLM_USE_AOT_COMPILE"] = SETTINGS[setting]  # build_engine keeps a value already set
    args.home = Path(home)
    settings, folder, tokenizer = setup(args, tiny_max_model_len=512)
    settings = settings.model_copy(update={"enforce_eager": False})  # compiled, also with --model tiny

    def prompt(round_no: int, i: int) -> list[int]:
        text = f"Request {round_no}-{i}: describe the number {i} in two sentences."
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer.encode(chat, add_special_tokens=False)

    started = time.perf_counter()
    engines = [build(setting, settings, folder)]
    start_s = time.perf_counter() - started

    async def rounds() -> list[float]:
        rates = []
        for round_no in range(args.rounds):
            began = time.perf_counter()
            done = await asyncio.gather(*(one(engines[0], prompt(round_no, i), args.max_tokens,
                                              f"{round_no}-{i}") for i in range(args.concurrency)))
            rates.append(sum(tokens for tokens, _ in done) / (time.perf_counter() - began))
        return rates

    try:
        rates = asyncio.run(rounds())
    finally:
        shutdown(engines)
    print(json.dumps({"start_s": round(start_s, 2), "tokens_per_s": [round(r, 1) for r in rates]}))


def start(setting: str, home: Path, args: argparse.Namespace) -> dict:
    """One start of `setting`'s engine on `home`, in a process of its own."""
    argv = [sys.executable, __file__, "--model", args.model, "--concurrency", str(args.concurrency),
            "--max-tokens", str(args.max_tokens), "--rounds", str(args.rounds), "--child", setting, str(home)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "TORCHINDUCTOR_"))}
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{setting}: the engine start failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"recompiled": RECOMPILED in out.stderr}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="al-start-") as scratch:
        base = args.home or Path(scratch)
        homes = {name: base / name for name in SETTINGS}
        results: dict[str, dict[str, dict]] = {name: {} for name in SETTINGS}
        for phase in ("cold", "warm"):
            for name in SETTINGS:
                with err.status(f"{name}: {phase} start"):
                    results[name][phase] = start(name, homes[name], args)
                r = results[name][phase]
                err.print(f"{name:<7} {phase}: started in {r['start_s']:.1f} s, then "
                          f"{statistics.median(r['tokens_per_s']):.1f} tokens/s"
                          f"{' (compiled again)' if r['recompiled'] else ''}")

    def median_rate(name: str) -> float:
        rates = results[name]
        return statistics.median([*rates["cold"]["tokens_per_s"], *rates["warm"]["tokens_per_s"]])

    summary = {
        "model": args.model, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        **{f"{name.replace('-', '_')}_{phase}_start_s": results[name][phase]["start_s"]
           for name in SETTINGS for phase in ("cold", "warm")},
        "aot_warm_start_compiled_again": results["aot"]["warm"]["recompiled"],
        "no_aot_warm_start_compiled_again": results["no-aot"]["warm"]["recompiled"],
        "warm_start_ratio_aot_vs_no_aot": round(results["aot"]["warm"]["start_s"]
                                                / results["no-aot"]["warm"]["start_s"], 3),
        # Minutes apart, in processes of their own: these say that each engine serves, not which is faster.
        "aot_tokens_per_s": median_rate("aot"), "no_aot_tokens_per_s": median_rate("no-aot"),
    }
    err.print(f"warm start: {summary['aot_warm_start_s']:.1f} s with the AOT cache, "
              f"{summary['no_aot_warm_start_s']:.1f} s without "
              f"({summary['warm_start_ratio_aot_vs_no_aot']:.2f}×)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
