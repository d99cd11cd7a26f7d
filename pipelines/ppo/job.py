"""`alignloop ppo train` as a pipeline step: resolve the models and prompts, run pipelines.ppo.train with every
iteration's metrics in MLflow (experiment "alignloop-ppo"), and register the result as a new
`alignloop-policy` version tagged with its lineage (parent policy version, reward-model version, prompt-set
hash). Registration does not promote: `alignloop ppo evaluate` gates that.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from alignloop import progress
from alignloop.config import Settings, vllm_cpu_environment
from alignloop.prompt_split import content_hash
from alignloop.registry import ModelVersionRef, fetch_version, resolve_alias
from pipelines.models_init import ensure_experiment, register_run_folder, tracking_uri
from pipelines.ppo import prompts as prompt_sources
from pipelines.ppo.args import validate
from pipelines.ppo.train import Args, Inputs, train

EXPERIMENT_NAME = "alignloop-ppo"


@dataclass
class Sources:
    """Where a run's inputs come from (CLI flags)."""

    policy: str = "@champion"  # "@ALIAS" of the registered policy, or a transformers folder
    reference: str = "@reference"  # π_ref for the KL penalty
    reward: str = "service"  # "service" | "inprocess" (@champion RM loaded here) | "fn:module:callable"
    prompt_file: Path | None = None
    store_prompts: bool = True  # the prompts users sent (feedback store)
    max_store_prompts: int | None = 10_000
    eval_fraction: float = 0.1
    ptx_file: Path | None = None  # demonstrations for PPO-ptx (JSON lines of {"messages": [...]})
    value_from_reward: bool = False  # initialise the critic from the RM (needs the policy's tokenizer)


def resolve_policy(settings: Settings, spec: str) -> tuple[Path, ModelVersionRef | None]:
    """A folder for "@ALIAS" (registered policy) or a path."""
    if spec.startswith("@"):
        ref = resolve_alias(settings.tracking_uri, settings.policy_model_name, spec[1:])
        return fetch_version(settings.tracking_uri, ref, settings.models_dir), ref
    path = Path(spec)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"policy {spec!r}: not a transformers folder (no config.json)")
    return path, None


def open_reward(settings: Settings, spec: str):
    """(RewardSource, the RM's folder when loaded here)."""
    from pipelines.ppo.rewards import FunctionReward, GrpcReward, InProcessReward

    if spec == "service":
        return GrpcReward(settings.reward_target), None
    if spec == "inprocess" or spec.startswith("inprocess:"):
        # "inprocess:VERSION": a registered RM that is not (yet) champion, e.g. the pipeline's candidate.
        version = spec.partition(":")[2]
        ref = (ModelVersionRef(settings.reward_model_name, version, None, "") if version else
               resolve_alias(settings.tracking_uri, settings.reward_model_name, settings.reward_model_alias))
        folder = fetch_version(settings.tracking_uri, ref, settings.models_dir)
        return InProcessReward(folder, version=f"{ref.name}/{ref.version}"), folder
    if spec.startswith("fn:"):
        return FunctionReward(spec[3:]), None
    raise ValueError(f"reward {spec!r}: expected service, inprocess[:VERSION] or fn:module:callable")


def load_prompts(settings: Settings, sources: Sources) -> tuple[list, list]:
    store = prompt_sources.read_store_prompts(settings.store, sources.max_store_prompts) \
        if sources.store_prompts else []
    from_file = prompt_sources.read_prompt_file(sources.prompt_file) if sources.prompt_file else []
    return prompt_sources.build_prompt_set(store, from_file, sources.eval_fraction)


def load_demonstrations(settings: Settings, sources: Sources) -> list:
    """PPO-ptx data: --ptx-file, else the newest snapshot's corrections and top-rated answers (the SFT data)."""
    from pipelines import demonstrations
    from pipelines.snapshots import newest_snapshot

    if sources.ptx_file:
        return demonstrations.from_file(sources.ptx_file)
    snapshot = newest_snapshot(settings.home)
    return demonstrations.from_snapshot(snapshot) if snapshot else []


def run(settings: Settings, args: Args, sources: Sources, *, out: Path | None = None, resume: bool = True,
        register: bool = True, console: Console | None = None) -> dict:
    """Trains, logs and registers; returns the summary the CLI prints as its last line."""
    import mlflow

    validate(args)  # before any model is resolved or MLflow run opened
    console = console or Console(stderr=True)
    rank = int(os.environ.get("RANK", "0"))
    policy_dir, policy_ref = resolve_policy(settings, sources.policy)
    reference_dir, reference_ref = resolve_policy(settings, sources.reference)
    train_prompts, held_out = load_prompts(settings, sources)
    if not train_prompts:
        raise ValueError("no training prompts: the feedback store has none and no --prompt-file was given")
    demonstrations = load_demonstrations(settings, sources) if args.gamma_ptx > 0 else []
    reward, rm_folder = open_reward(settings, sources.reward)
    value_init = None
    if sources.value_from_reward:
        from pipelines.ppo.models import same_tokenizer

        if rm_folder is None or not same_tokenizer(rm_folder / "backbone", policy_dir):
            raise ValueError("--value-from-reward needs --reward inprocess and an RM on the policy's tokenizer")
        value_init = rm_folder

    digest = content_hash(train_prompts)
    out = out or settings.home / "runs" / f"ppo-{digest[:12]}"
    lineage = {"alignloop.kind": "ppo", "alignloop.parent_policy_version": policy_ref.version if policy_ref else "",
               "alignloop.reference_policy_version": reference_ref.version if reference_ref else "",
               "alignloop.reward_model_version": reward.version or sources.reward,
               "alignloop.prompt_set_hash": digest, "alignloop.train_prompts": str(len(train_prompts)),
               "alignloop.held_out_prompts": str(len(held_out))}
    if getattr(reward, "untrained", False):
        # Allowed (a fresh stack, a smoke test), but its rewards are noise: say so, and keep it in the lineage.
        lineage["alignloop.reward_untrained"] = "true"
        if rank == 0:
            console.print("[yellow]the reward model is the untrained placeholder: its rewards are noise until "
                          "`alignloop reward train` promotes a trained one[/]")
    if rank == 0:
        console.print(f"PPO on {policy_dir.name} ({lineage['alignloop.parent_policy_version'] or 'folder'}): "
                      f"{len(train_prompts)} training prompts, {len(held_out)} held out; rewards from "
                      f"{reward.version or sources.reward}")
    track = register and rank == 0
    with contextlib.ExitStack() as stack:
        stack.callback(reward.close)
        active = None
        if track:
            from mlflow import MlflowClient

            stack.enter_context(tracking_uri(settings.tracking_uri))
            experiment_id = ensure_experiment(MlflowClient(settings.tracking_uri), EXPERIMENT_NAME)
            # A context manager: the run ends FAILED if training raises, FINISHED otherwise.
            active = stack.enter_context(mlflow.start_run(experiment_id=experiment_id,
                                                          run_name=f"ppo-{digest[:12]}", tags=lineage))
            mlflow.log_params({k: str(v)[:6000] for k, v in (asdict(args) | asdict(sources)).items()})

        def log(iteration: int, metrics: dict) -> None:
            progress.report(iteration, args.iterations, reward=metrics["reward"], kl=metrics["kl"])
            if track:
                mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                                    if isinstance(v, int | float) and math.isfinite(v)}, step=iteration, synchronous=False)

        result = train(Inputs(policy_dir, reference_dir, train_prompts, reward, value_init, demonstrations), args,
                       out, resume=resume, engine_env=vllm_cpu_environment(settings), on_iteration=log,
                       console=console)
        summary = {"iterations": result.iterations_done, "resumed_from": result.resumed_from,
                   "model_dir": str(result.final_dir), "run_id": active.info.run_id if active else None,
                   "model_version": None, "prompt_set_hash": digest, "reward_model_version": reward.version}
        if result.history:
            last = result.history[-1]
            summary |= {"reward": last["reward"], "kl": last["kl"], "beta": last["beta"]}
        if track:
            mlflow.flush_async_logging()
            if result.iterations_done == args.iterations:
                mv = register_run_folder(settings, settings.policy_model_name, active.info.run_id,
                                         result.final_dir, tags=lineage,
                                         description="Policy trained by `alignloop ppo train`.",
                                         model_description="The policy served to users.")
                summary["model_version"] = str(mv.version)
                mlflow.set_tag("alignloop.model_version", str(mv.version))
                console.print(f"{settings.policy_model_name} version {mv.version} registered (not promoted: "
                              f"`alignloop ppo evaluate` decides)")
        return summary
