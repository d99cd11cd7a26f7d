"""`alignloop demo`: the whole loop once, against a running stack, through its public and operator APIs only.

1. baseline   the served policy answers the held-out prompts (never used for training: the same hash split
              PPO holds out), one seeded answer each
2. traffic    simulated users chat and give feedback (`alignloop simulate`'s labeler, with label noise)
3. pipeline   an operator-triggered run: snapshot → RM → RM gate → PPO → policy gate → promote → serving
4. after      the promoted policy answers the same held-out prompts with the same seeds; the labeler
              (noise-free) judges each pair: the win rate. More simulated traffic gives the new version
              its own thumbs.
5. report     thumbs-up rate per model version (the gateway's feedback stats), win rate, KL to the reference
              (the policy gate's), the time of each step; the last stdout line is the report as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from alignloop import credentials
from alignloop.config import Settings
from alignloop.console_progress import ProgressBar
from alignloop.gateway_client import GatewayClient, GatewayError
from alignloop.simulate import prompts as prompt_sets
from alignloop.simulate.labeler import Labeler
from alignloop.simulate.traffic import HttpError, Report, post_json, simulate

err = Console(stderr=True, soft_wrap=True)
HELD_OUT_FRACTION = 0.1  # = PPO's default eval_fraction: these prompts are never trained on
# PPO and gate settings that move SmolLM2-135M visibly within a few minutes on two cores (measured: 8
# iterations at policy_lr 1e-5 win 79% of held-out pairs under the labeler's score used directly as reward).
DEMO_CONFIG: dict[str, Any] = {
    # Served answers are short (max_tokens 48): 128 tokens hold prompt and answer, at half the cost of 256.
    "reward": {"epochs": 2, "batch_size": 8, "max_length": 128, "lr": 1e-4},
    # No critic (rloo): a critic starting from scratch is mostly noise over a dozen iterations, and skipping it
    # leaves the time for 4 answers per prompt, whose leave-one-out baseline is what makes the signal.
    # policy_lr 6e-5, not 2e-5: 10 iterations of 2 optimiser steps are all a 900 s budget holds, and at 2e-5
    # PPO's reward barely rose (0.050 at the last iteration); at 6e-5 it reached 0.143 and 1.93 in two runs
    # (README: the demo's runs).
    # missing_eos_penalty (TRL's PPO/RLOO knob; its examples use 1.0): an answer cut off by max_new_tokens loses
    # 1.0 of reward. Nine answers in ten of SmolLM2 run past 48 tokens, so the few that end by themselves are too
    # rare in the feedback for the RM to learn that ending matters (measured: 85-100% cut off throughout PPO).
    "ppo": {"iterations": 10, "prompts_per_iteration": 8, "samples_per_prompt": 4, "max_new_tokens": 48,
            "advantage_estimator": "rloo", "policy_lr": 6e-5, "ppo_epochs": 1, "minibatch_size": 16, "beta": 0.02,
            "missing_eos_penalty": 1.0, "max_model_len": 512, "checkpoint_every": 0},
    "evaluate": {"max_prompts": 16, "samples_per_prompt": 1, "max_new_tokens": 48, "min_win_rate": 0.5,
                 "max_kl": 50.0},
    "min_pairs": 20,
}
# Mostly rankings of the n answers: a ranking of 4 is C(4,2) = 6 preference pairs for one request, the most
# reward-model signal per simulated user (InstructGPT's labelers ranked 4 to 9 answers for the same reason).
MIX = {"ranking": 0.6, "comparison": 0.2, "thumbs": 0.1, "rating": 0.1}


def answer(client: httpx.Client, messages: list[dict], seed: int, max_tokens: int) -> dict:
    """One seeded answer from the served policy: text, finish reason and the version that wrote it."""
    body = post_json(client, "/v1/chat/completions", {"model": "alignloop-policy", "messages": messages,
                                                      "max_tokens": max_tokens, "seed": seed, "temperature": 1.0})
    choice = body["choices"][0]
    return {"text": choice["message"]["content"] or "", "finish_reason": choice["finish_reason"],
            "version": (body.get("system_fingerprint") or "").rpartition("/v")[2]}


def answers(base_url: str, app_key: str, prompts: list[list[dict]], max_tokens: int, seed: int) -> list[dict]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {app_key}"}, timeout=600) as client, \
            ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda ip: answer(client, ip[1], seed + ip[0], max_tokens), enumerate(prompts)))


def win_rate(labeler: Labeler, prompts: list[list[dict]], new: list[dict], old: list[dict]) -> float:
    """Share of held-out prompts where the labeler (noise-free) prefers the new answer; ties count half."""
    from alignloop.simulate.labeler import Answer

    judged = [labeler.judge(prompt_sets.prompt_text(p), Answer(a["text"], a["finish_reason"]),
                            Answer(b["text"], b["finish_reason"])) for p, a, b in zip(prompts, new, old, strict=True)]
    return sum(judged) / len(judged)


def answer_stats(answers_: list[dict]) -> dict[str, float]:
    """What changed in the answers themselves: the share that ended by themselves (not cut off at max_tokens)
    and their mean length in words."""
    from alignloop.simulate.labeler import words

    n = max(1, len(answers_))
    return {"finished_share": round(sum(a["finish_reason"] == "stop" for a in answers_) / n, 4),
            "mean_words": round(sum(len(words(a["text"])) for a in answers_) / n, 1)}


def _step_seconds(run: dict) -> dict[str, float]:
    from alignloop.pipeline_cli import parse_time

    out = {}
    for step in run["steps"]:
        start, end = parse_time(step.get("started_at")), parse_time(step.get("finished_at"))
        if start and end:
            out[step["name"]] = round((end - start).total_seconds(), 1)
    return out


def simulated_traffic(base: str, app_key: str, *, requests: int, **kwargs) -> Report:
    """`simulate` with the demo's mix and concurrency, showing how many requests are done."""
    with ProgressBar(err, "traffic", requests, unit=" requests") as bar:
        return simulate(base, app_key, requests=requests, mix=MIX, concurrency=4,
                        on_progress=lambda done, _total: bar.update(done), **kwargs)


def run_demo(args: argparse.Namespace) -> dict:
    settings = Settings()
    keys = credentials.load(settings.credentials_path)
    base = settings.gateway_url
    started = time.monotonic()
    training, held_out = prompt_sets.split(prompt_sets.generate(args.seed), HELD_OUT_FRACTION)
    held_out = held_out[:args.eval_prompts]
    labeler = Labeler(noise=args.noise, seed=args.seed)

    err.print(f"[bold]1/5[/] baseline: the served policy answers {len(held_out)} held-out prompts")
    before = answers(base, keys.app_key, held_out, args.max_tokens, args.seed)
    old_version = before[0]["version"]

    err.print(f"[bold]2/5[/] traffic: {args.requests} simulated users' requests (n={args.n}) with feedback "
              f"(label noise {args.noise:.0%})")
    traffic = simulated_traffic(base, keys.app_key, requests=args.requests, n=args.n, labeler=labeler,
                                max_tokens=args.max_tokens, seed=args.seed, prompts=training)
    if traffic.responses == 0:
        raise GatewayError(f"no answers from the chat API: {traffic.errors[:3]}")

    err.print("[bold]3/5[/] pipeline run (snapshot → RM → gate → PPO → gate → promote → serving)")
    config = copy.deepcopy(DEMO_CONFIG)
    config["ppo"]["iterations"] = args.ppo_iterations
    from alignloop.pipeline_cli import wait_for_run

    with GatewayClient(base, keys.operator_key) as ops:
        run = ops.start_run(reason="alignloop demo", config=config)
        run, _ = wait_for_run(ops, run, None)
    promoted = run.get("promoted_policy_version")

    err.print(f"[bold]4/5[/] after: {'v' + promoted if promoted else 'the unchanged champion'} answers the "
              "same held-out prompts; more simulated traffic")
    after = answers(base, keys.app_key, held_out, args.max_tokens, args.seed)
    rate = win_rate(labeler, held_out, after, before)
    simulated_traffic(base, keys.app_key, requests=args.after_requests, n=args.n, labeler=labeler.fork("after"),
                      max_tokens=args.max_tokens, seed=args.seed + 1, prompts=training)

    err.print("[bold]5/5[/] report")
    with GatewayClient(base, keys.operator_key) as ops:
        stats = ops.request("GET", "/v1/admin/feedback/stats", params={"days": 0})
    thumbs = {s["model_version"]: s["thumbs_up_rate"] for s in stats["by_model_version"]}
    gate = next((s.get("summary") or {} for s in run["steps"] if s["name"] == "policy_gate"), {})
    return {
        "win_rate": round(rate, 4), "loop_seconds": round(time.monotonic() - started, 1),
        "promoted_version": promoted, "previous_version": old_version,
        "served_after": after[0]["version"], "run_status": run["status"], "run_outcome": run.get("outcome"),
        "run_id": run["id"], "kl_to_reference": gate.get("kl_candidate"),
        "gate_win_rate_under_rm": gate.get("win_rate"), "thumbs_up_rate_by_version": thumbs,
        "answers_before": answer_stats(before), "answers_after": answer_stats(after),
        "step_seconds": _step_seconds(run), "held_out_prompts": len(held_out),
        "traffic": {"requests": traffic.requests, "feedback": traffic.feedback, "failures": traffic.failures},
    }


def print_report(report: dict) -> None:
    table = Table(title="alignloop demo")
    table.add_column("figure")
    table.add_column("value", overflow="fold")
    rows = [("win rate of the new policy vs the old (labeler, held-out prompts)", f"{report['win_rate']:.1%}"),
            ("promoted", f"v{report['previous_version']} → v{report['promoted_version']}"
             if report["promoted_version"] else f"nothing ({report['run_outcome'] or report['run_status']})"),
            ("KL to the reference (nats per answer)", str(report["kl_to_reference"])),
            ("answers that ended by themselves, before → after",
             f"{report['answers_before']['finished_share']:.0%} → {report['answers_after']['finished_share']:.0%}"),
            ("mean words per answer, before → after",
             f"{report['answers_before']['mean_words']} → {report['answers_after']['mean_words']}"),
            ("thumbs-up rate by version", ", ".join(f"v{v}: {r:.0%}" if r is not None else f"v{v}: -"
                                                    for v, r in sorted(report["thumbs_up_rate_by_version"].items()))),
            ("whole loop", f"{report['loop_seconds']:.0f} s")]
    rows += [(f"  step {name}", f"{s:.0f} s") for name, s in report["step_seconds"].items()]
    for row in rows:
        table.add_row(*row)
    err.print(table)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        report = run_demo(args)
    except (GatewayError, HttpError, httpx.HTTPError, FileNotFoundError) as exc:
        err.print(f"[red]✗ {exc}[/] (is `make run` / `alignloop up` running?)")
        return 1
    print_report(report)
    print(json.dumps(report))
    return 0 if report["promoted_version"] else 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the whole loop once against the running stack (simulated users, a "
                          "pipeline run, promotion) and report win rate, thumbs-up rates, KL and step times",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--requests", type=int, default=200, help="simulated requests before the run")
    demo.add_argument("--n", type=int, default=4, help="answers per simulated request (ranked, compared, rated)")
    demo.add_argument("--after-requests", type=int, default=40, help="simulated requests after promotion")
    demo.add_argument("--eval-prompts", type=int, default=40, help="held-out prompts judged for the win rate")
    demo.add_argument("--ppo-iterations", type=int, default=DEMO_CONFIG["ppo"]["iterations"])
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument("--noise", type=float, default=0.25, help="label noise (AlpacaFarm: 0.25)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
