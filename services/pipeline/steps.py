"""The steps of a run, in order. Each takes (runner, context, its Step record), does its job, mostly by running
an `alignloop` command as a worker process, and leaves what later steps need in `context.outputs`. A step
raises StepFailed to fail the run; a gate that says no sets `context.stop_reason`, which skips the rest and
ends the run "not promoted"."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.pipeline import config as run_config
from services.pipeline.runs import Step, now


class StepFailed(Exception):
    """The step could not do its job; the run fails with this message."""


class Cancelled(Exception):
    pass


@dataclass
class Context:
    """What the steps of one run share."""

    run_id: str
    config: run_config.RunConfig
    folder: Path
    steps: dict[str, Step]
    outputs: dict = field(default_factory=dict)
    stop_reason: str | None = None  # set by a gate that says no: the remaining steps are skipped


def snapshot(runner, ctx: Context, step: Step) -> None:
    """`feedback export`: the store as training data (pairs, pointwise labels, demonstrations)."""
    taken_at = now()
    _, summary = runner.run_command(ctx, step, ["feedback", "export", "--json", "--out",
                                                str(ctx.folder / "snapshot")])
    runner.store.update(ctx.run_id, snapshot_at=taken_at)
    counts = summary.get("counts", {})
    ctx.outputs["snapshot"] = summary.get("folder") or str(ctx.folder / "snapshot")
    ctx.outputs["pairs"] = int(counts.get("pairs", 0))
    step.summary = {"hash": summary.get("hash"), **counts}
    step.detail = (f"{counts.get('feedback', 0)} feedback events → {counts.get('pairs', 0)} pairs, "
                   f"{counts.get('pointwise', 0)} pointwise labels, {counts.get('demonstrations', 0)} "
                   f"demonstrations")


def reward_train(runner, ctx: Context, step: Step) -> None:
    """`reward train --no-promote` on the snapshot: a new RM version, registered and judged, not promoted."""
    cfg = ctx.config
    if cfg.skip_reward:
        step.status, step.detail = "skipped", "skip_reward is set"
        return
    if ctx.outputs["pairs"] < cfg.min_pairs:
        step.status = "skipped"
        step.detail = f"{ctx.outputs['pairs']} preference pairs < min_pairs={cfg.min_pairs}: the RM is not retrained"
        return
    _, summary = runner.run_command(ctx, step, ["reward", "train", "--snapshot", ctx.outputs["snapshot"],
                                                "--no-promote", *run_config.flags(cfg.reward)])
    if not summary.get("model_version"):
        raise StepFailed("reward train registered no model version")
    ctx.outputs["reward_trained"] = summary
    by_source = summary.get("eval_accuracy_by_source") or {}
    kinds = ", ".join(f"{source} {_pct(v.get('eval_accuracy'))}" for source, v in by_source.items())
    step.detail = (f"alignloop-reward v{summary['model_version']}: held-out accuracy "
                   f"{_pct(summary.get('eval_accuracy'))} on {summary.get('eval_pairs')} pairs"
                   + (f" ({kinds})" if len(by_source) > 1 else ""))


def reward_gate(runner, ctx: Context, step: Step) -> None:
    """The new RM replaces the champion only if it is at least as accurate on the same held-out pairs (the
    verdict `reward train` recorded). Either way, later steps score with `ctx.outputs["reward_version"]`."""
    trained = ctx.outputs.get("reward_trained")
    champion = _champion_version(runner.settings, runner.settings.reward_model_name,
                                 runner.settings.reward_model_alias)
    if trained is None:
        ctx.outputs["reward_version"] = champion
        step.status, step.detail = "skipped", f"no new RM: PPO scores with the champion, v{champion}"
    elif (trained.get("eval_accuracy") or 0.0) < ctx.config.reward_min_accuracy:
        ctx.outputs["reward_version"] = champion
        step.detail = (f"v{trained['model_version']} refused: held-out accuracy {_pct(trained.get('eval_accuracy'))}"
                       f" < reward_min_accuracy {_pct(ctx.config.reward_min_accuracy)}; PPO would score with "
                       f"the champion, v{champion}")
    elif trained.get("gate_passed"):
        ctx.outputs["reward_version"] = ctx.outputs["reward_candidate"] = str(trained["model_version"])
        step.detail = (f"v{trained['model_version']} passes ({trained.get('gate')}); it scores PPO and is "
                       f"promoted with the policy")
    else:
        ctx.outputs["reward_version"] = champion
        step.detail = (f"v{trained['model_version']} refused ({trained.get('gate')}); PPO scores with the "
                       f"champion, v{champion}")
    step.summary = {"reward_version": ctx.outputs["reward_version"],
                    "gate_passed": ctx.outputs.get("reward_candidate") is not None}
    if champion and ctx.outputs["reward_version"] == champion and _untrained_rm(runner.settings, champion):
        ctx.stop_reason = ("no trained reward model yet (the champion RM is the untrained placeholder, whose "
                           "scores are noise): PPO needs users' preference pairs first")


def ppo(runner, ctx: Context, step: Step) -> None:
    """`ppo train` from the champion policy against the chosen RM (in-process), under torchrun with
    `nproc_per_node` workers; registers a new policy version."""
    cfg = ctx.config
    args = ["ppo", "train", "--policy", "@champion", "--reference", "@reference",
            "--reward", f"inprocess:{ctx.outputs['reward_version']}", "--out", str(ctx.folder / "ppo"),
            *run_config.flags(cfg.ppo)]
    if cfg.prompt_file:
        args += ["--prompt-file", cfg.prompt_file]
    # Always through torchrun, also with one process: the same launch path as on a GPU node.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={cfg.nproc_per_node}", "-m", "alignloop.cli"]
    _, summary = runner.run_command(ctx, step, args, launcher_argv=launcher)
    if not summary.get("model_version"):
        raise StepFailed("ppo train registered no model version")
    ctx.outputs["policy_candidate"] = str(summary["model_version"])
    step.detail = (f"alignloop-policy v{summary['model_version']}: {summary.get('iterations')} iterations, "
                   f"reward {_num(summary.get('reward'))}, KL {_num(summary.get('kl'))}")


def policy_gate(runner, ctx: Context, step: Step) -> None:
    """`ppo evaluate`: candidate vs champion on held-out prompts under the same RM; exit 3 = the gates say no."""
    args = ["ppo", "evaluate", "--candidate", ctx.outputs["policy_candidate"],
            "--reward", f"inprocess:{ctx.outputs['reward_version']}", *run_config.flags(ctx.config.evaluate)]
    if ctx.config.prompt_file:
        args += ["--prompt-file", ctx.config.prompt_file]
    code, summary = runner.run_command(ctx, step, args, ok_codes=(0, 3))
    figures = (f"win rate {_pct(summary.get('win_rate'))}, reward {_num(summary.get('reward_candidate'))} vs "
               f"{_num(summary.get('reward_champion'))}, KL {_num(summary.get('kl_candidate'))}")
    if code == 3:
        reasons = "; ".join(summary.get("reasons") or []) or "the gates failed"
        step.detail = f"refused: {reasons} ({figures})"
        ctx.stop_reason = f"policy gate: {reasons}"
    else:
        step.detail = f"passes: {figures}"


def promote(runner, ctx: Context, step: Step) -> None:
    """Moves @champion: the RM (if its gate passed), then the policy. Not cancellable from here on."""
    runner.promoting.add(ctx.run_id)
    with runner.registry_lock:
        _promote(runner, ctx, step)


def _promote(runner, ctx: Context, step: Step) -> None:
    from pipelines import promotion

    s = runner.settings
    moves = []
    reason = f"pipeline run {ctx.run_id}"
    if ctx.outputs.get("reward_candidate"):
        move = promotion.promote(s, s.reward_model_name, ctx.outputs["reward_candidate"], reason=reason,
                                 alias=s.reward_model_alias)
        ctx.outputs["promoted_reward"] = move.current
        moves.append(f"{move.name} {move.previous} → {move.current}")
    move = promotion.promote(s, s.policy_model_name, ctx.outputs["policy_candidate"], reason=reason)
    ctx.outputs["promoted_policy"] = move.current
    moves.append(f"{move.name} {move.previous} → {move.current}")
    ctx.outputs["outcome"] = f"promoted {s.policy_model_name} v{move.current}" + (
        f" and {s.reward_model_name} v{ctx.outputs['promoted_reward']}" if ctx.outputs.get("promoted_reward") else "")
    step.detail = "; ".join(moves)
    step.summary = {"policy_version": move.current, "reward_version": ctx.outputs.get("promoted_reward")}


def serving(runner, ctx: Context, step: Step) -> None:
    """Waits until the policy (and reward) service report the promoted versions: they follow the alias and
    swap in place."""
    s = runner.settings
    want = {"policy": ctx.outputs["promoted_policy"]}
    if ctx.outputs.get("promoted_reward"):
        want["reward"] = ctx.outputs["promoted_reward"]
    deadline = time.monotonic() + ctx.config.serving_timeout_s
    started = time.monotonic()
    seen: dict[str, str] = {}
    while True:
        seen = {name: _served_version(s, name) for name in want}
        if seen == want:
            break
        if time.monotonic() > deadline:
            raise StepFailed(f"after {ctx.config.serving_timeout_s:g} s the services serve {seen}, not {want} "
                             "(the champion aliases have moved; are the services running?)")
        time.sleep(1.0)
    waited = time.monotonic() - started
    step.summary = {"seconds_to_serve": round(waited, 3)}
    step.detail = f"serving {', '.join(f'{k} v{v}' for k, v in want.items())} after {waited:.1f} s"


STEPS = [("snapshot", snapshot), ("reward_train", reward_train), ("reward_gate", reward_gate), ("ppo", ppo),
         ("policy_gate", policy_gate), ("promote", promote), ("serving", serving)]


# ---- helpers -----------------------------------------------------------------------------------------------
def _champion_version(settings, name: str, alias: str) -> str:
    from alignloop.registry import ModelNotRegistered, resolve_alias

    try:
        return resolve_alias(settings.tracking_uri, name, alias).version
    except ModelNotRegistered:
        raise StepFailed(f"{name}@{alias} is not registered (`alignloop models init` registers one)") from None


def _served_version(settings, service: str) -> str:
    """The version the policy or reward service answers with now ("" when it does not answer)."""
    from alignloop import components

    info = (components.policy_info(settings.policy_target, timeout=5) if service == "policy" else
            components.reward_info(settings.reward_target, timeout=5))
    return info.model.version if info is not None else ""


def _untrained_rm(settings, version: str) -> bool:
    from alignloop.registry import ModelVersionRef, is_untrained

    return is_untrained(settings.tracking_uri, ModelVersionRef(settings.reward_model_name, version, None, ""))


def _pct(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "-"


def _num(value) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"
