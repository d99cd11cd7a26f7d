"""One PPO iteration on SmolLM2-135M-Instruct: where the time goes, and the rollout engine against
transformers' `generate`, in the same run.

  rollouts     the same prompts, answers per prompt and max_new_tokens, sampled (temperature 1, no top-k)
               by the in-process vLLM engine the trainer uses (pipelines/ppo/rollout.py: VLLMRollout) and by
               transformers `generate` on the same weights (HFRollout), --rounds times alternating; the best
               round of each counts (other users of the machine only ever slow a round down)
  PPO          --iterations iterations of pipelines.ppo.train with the vLLM engine and the RM in-process
               (all-MiniLM-L6-v2 with a fresh head: the scoring cost of the default RM; its rewards are
               noise, which does not change the cost); the last iteration's time split is reported
               (generation, scoring, training, weight_sync)

Both engines and the trainer run in float32 (--dtype), the trainer's precision, so the logprobs PPO compares
are like for like. On a CUDA machine the same script runs on the GPU.

    .venv/bin/python benchmarks/ppo_step.py
    .venv/bin/python benchmarks/ppo_step.py --tiny      # the tiny random policy: a quick check

The last line on stdout is a JSON object (rollout_speedup_vs_hf, weight_sync_s, the time split, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BENCH_DIR = REPO / ".alignloop" / "bench"
TOPICS = ["the sea", "bread", "a quiet village", "the moon", "learning to cook", "rainy days", "a lost key",
          "friendship", "winter mornings", "an old map", "bicycles", "a small robot", "mountains", "tea",
          "libraries", "the first snow"]


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write a few sentences about {TOPICS[i % len(TOPICS)]}."}]
            for i in range(n)]


def policy_folder(tiny: bool) -> Path:
    """The benchmark's policy folder, built once under .alignloop/bench/."""
    from pipelines.models_init import build_smollm2_policy, build_tiny_policy

    dest = BENCH_DIR / ("tiny-policy" if tiny else "smollm2-135m")
    if not (dest / "config.json").exists():
        if tiny:
            build_tiny_policy(dest)
        else:
            build_smollm2_policy(dest, BENCH_DIR / "cache")
    return dest


def rollout_rate(engine, prompt_ids, n: int, max_tokens: int, seed: int) -> tuple[float, int, float]:
    """(answer tokens per second, answer tokens, seconds) of one batch."""
    started = time.perf_counter()
    samples = engine.generate(prompt_ids, n=n, max_tokens=max_tokens, temperature=1.0, seed=seed)
    seconds = time.perf_counter() - started
    tokens = sum(len(s.response_ids) for s in samples)
    return tokens / seconds, tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random policy instead of SmolLM2-135M")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=2, help="PPO iterations (the last one is reported)")
    parser.add_argument("--dtype", default="float32")
    cli = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from alignloop.config import Settings, vllm_cpu_environment
    from pipelines.models_init import build_minilm_reward_model, build_tiny_reward_model
    from pipelines.ppo.args import Args
    from pipelines.ppo.models import load_policy, prompt_token_ids
    from pipelines.ppo.rewards import InProcessReward
    from pipelines.ppo.rollout import HFRollout, VLLMRollout
    from pipelines.ppo.train import Inputs, train

    hf_logging.disable_progress_bar()
    console = Console(stderr=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = policy_folder(cli.tiny)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    chats = prompts(cli.prompts)
    prompt_ids = [prompt_token_ids(tokenizer, m) for m in chats]
    env = vllm_cpu_environment(Settings(home=BENCH_DIR / "home"))
    result: dict = {"model": folder.name, "device": device, "dtype": cli.dtype, "prompts": cli.prompts,
                    "samples_per_prompt": cli.samples_per_prompt, "max_new_tokens": cli.max_new_tokens,
                    "loadavg_start": os.getloadavg()[0]}

    # ---- rollouts: vLLM vs HF generate ----------------------------------------------------------------
    console.print(f"rollouts: {cli.prompts} prompts × {cli.samples_per_prompt} answers × ≤{cli.max_new_tokens} "
                  f"tokens on {folder.name} ({device}, {cli.dtype})")
    dtype = getattr(torch, cli.dtype)
    hf_model = load_policy(folder, dtype).to(device)
    hf = HFRollout(hf_model, tokenizer)
    vllm = VLLMRollout(folder, max_model_len=1024, seed=0, dtype=cli.dtype, env=env,
                       gpu_memory_utilization=0.3 if device == "cuda" else 0.9)
    # Warm-up: the first batch of each pays one-time costs (kernel selection, allocator growth).
    rollout_rate(vllm, prompt_ids[:2], 1, 8, seed=1)
    rollout_rate(hf, prompt_ids[:2], 1, 8, seed=1)
    best = {"vllm": (0.0, 0, 0.0), "hf": (0.0, 0, 0.0)}
    for r in range(cli.rounds):
        for name, engine in (("vllm", vllm), ("hf", hf)):
            got = rollout_rate(engine, prompt_ids, cli.samples_per_prompt, cli.max_new_tokens, seed=100 + r)
            console.print(f"  round {r + 1} {name:5s} {got[0]:8.1f} tokens/s ({got[1]} tokens in {got[2]:.2f} s)")
            best[name] = max(best[name], got)
    vllm.close()
    del hf_model, hf
    result |= {"vllm_tokens_per_s": round(best["vllm"][0], 1), "hf_tokens_per_s": round(best["hf"][0], 1),
               "rollout_speedup_vs_hf": round(best["vllm"][0] / best["hf"][0], 3)}

    # ---- PPO iterations ---------------------------------------------------------------------------------
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        rm_dir = Path(tmp) / "rm"
        (build_tiny_reward_model if cli.tiny else build_minilm_reward_model)(rm_dir)
        reward = InProcessReward(rm_dir, version="bench", device=device)
        args = Args(iterations=cli.iterations, prompts_per_iteration=cli.prompts,
                    samples_per_prompt=cli.samples_per_prompt, max_new_tokens=cli.max_new_tokens,
                    minibatch_size=8, ppo_epochs=1, checkpoint_every=0, dtype=cli.dtype, max_model_len=1024)
        console.print(f"PPO: {cli.iterations} iterations, {cli.prompts * cli.samples_per_prompt} answers each")
        run = train(Inputs(folder, folder, chats, reward), args, Path(tmp) / "out", resume=False, engine_env=env,
                    console=console)
    last = run.history[-1]
    split = {k[len("time_"):-2]: round(v, 3) for k, v in last.items() if k.startswith("time_")}
    result |= {"iteration_s": round(last["iteration_s"], 3), "time_split_s": split,
               "weight_sync_s": round(last["time_weight_sync_s"], 4),
               "logprob_gap": last["logprob_gap"], "ppo_rollout_tokens_per_s": round(last["rollout_tokens_per_s"], 1),
               "params": sum(p.numel() for p in load_policy(folder).parameters()),
               "loadavg_end": os.getloadavg()[0]}

    table = Table(title=f"PPO iteration on {folder.name} ({device})")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    total = sum(split.values())
    for k, v in split.items():
        table.add_row(k, f"{v:.3f}", f"{v / total:.0%}")
    console.print(table)
    console.print(f"rollouts: vLLM {result['vllm_tokens_per_s']} tokens/s vs HF generate "
                  f"{result['hf_tokens_per_s']} tokens/s = {result['rollout_speedup_vs_hf']}×; weight sync "
                  f"{result['weight_sync_s']} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
