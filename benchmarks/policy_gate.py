"""The policy gate's sampling: both policies' answers from one engine (the champion's weights loaded in place
after the candidate's answers, pipelines/ppo/evaluate.py: sample_both) against one engine per policy (the way
the gate sampled before; sample_both's own fallback, `reuse_engine=False`), side by side in one process.

Each round runs both ways, in alternating order, on the same prompts and seeds; the best round of each counts
(other users of the machine only ever slow a round down). The candidate is the champion with a perturbed copy
of its weights, saved like a PPO result.

    .venv/bin/python benchmarks/policy_gate.py            # SmolLM2-135M, the demo's gate size (16 prompts)
    .venv/bin/python benchmarks/policy_gate.py --tiny

The last line on stdout is a JSON object (seconds of each way, speedup_vs_two_engines, same_answers).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.ppo_step import BENCH_DIR, policy_folder, prompts  # noqa: E402


def perturbed(folder: Path) -> Path:
    """`folder`'s model with small noise on every weight, saved once beside it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = folder.with_name(folder.name + "-perturbed")
    if not (dest / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        model.save_pretrained(str(dest))
        AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(dest))
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny random policy instead of SmolLM2-135M")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()

    from alignloop.config import Settings, vllm_cpu_environment
    from pipelines.ppo.evaluate import sample_both

    env = vllm_cpu_environment(Settings(home=BENCH_DIR / "home"))
    champion = policy_folder(a.tiny)
    candidate = perturbed(champion)
    conversations = prompts(a.prompts)
    sample = functools.partial(sample_both, candidate, champion, conversations, n=a.samples_per_prompt,
                               max_new_tokens=a.max_new_tokens, seed=0, engine_env=env)
    ways = {"one_engine": lambda: sample()[:2], "two_engines": lambda: sample(reuse_engine=False)[:2]}
    seconds: dict[str, list[float]] = {k: [] for k in ways}
    answers = {}
    for r in range(a.rounds):
        for name in (list(ways) if r % 2 == 0 else list(reversed(ways))):
            started = time.perf_counter()
            answers[name] = ways[name]()
            seconds[name].append(time.perf_counter() - started)
            print(f"round {r + 1}: {name:12s} {seconds[name][-1]:6.2f} s", file=sys.stderr)
    same = all([s.response_ids for s in one] == [s.response_ids for s in two]
               for one, two in zip(answers["one_engine"], answers["two_engines"], strict=True))
    best = {k: min(v) for k, v in seconds.items()}
    print(f"one engine {best['one_engine']:.2f} s, two engines {best['two_engines']:.2f} s: "
          f"{best['two_engines'] / best['one_engine']:.2f}x; the same answers: {same}")
    print(json.dumps({"model": "tiny" if a.tiny else "smollm2-135m", "prompts": a.prompts,
                      "one_engine_s": round(best["one_engine"], 3), "two_engines_s": round(best["two_engines"], 3),
                      "speedup_vs_two_engines": round(best["two_engines"] / best["one_engine"], 3),
                      "same_answers": same, "rounds": seconds}))


if __name__ == "__main__":
    main()
