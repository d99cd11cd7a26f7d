"""A trained reward model's way into MLflow: the run (params, per-step metrics, dataset, model folder), a new
registered version of settings.reward_model_name, and the gate that decides whether it becomes @champion.

The gate (InstructGPT leaves this to people; a running loop needs a rule): the current champion is scored on
the SAME held-out pairs as the new model, and the new version gets the alias only if
    new_accuracy >= champion_accuracy - tolerance.
No champion, or a champion tagged `alignloop.untrained=true` (a placeholder registered so that the reward
service can start), is always beaten. Both accuracies and the decision are tags of the new version and of
its run.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from alignloop.config import Settings
from alignloop.console_progress import working
from alignloop.registry import ModelNotRegistered, ModelVersionRef, fetch_version, is_untrained, resolve_alias
from alignloop.reward_model import UNTRAINED_TAG, RewardModel
from pipelines.models_init import ensure_experiment, register_run_folder, tracking_uri
from pipelines.reward.datasets import RewardData

EXPERIMENT_NAME = "alignloop-reward"


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    reason: str


def decide(new_accuracy: float | None, champion_accuracy: float | None, tolerance: float, *,
           has_champion: bool, champion_untrained: bool = False) -> GateDecision:
    """Whether the new model should become champion, and why."""
    if not has_champion:
        return GateDecision(True, "no champion yet")
    if champion_untrained:
        return GateDecision(True, "the champion is an untrained placeholder")
    if new_accuracy is None or champion_accuracy is None:
        return GateDecision(False, "no held-out pairs to compare the two on")
    if new_accuracy >= champion_accuracy - tolerance:
        return GateDecision(True, f"{new_accuracy:.4f} >= {champion_accuracy:.4f} - {tolerance:g}")
    return GateDecision(False, f"{new_accuracy:.4f} < {champion_accuracy:.4f} - {tolerance:g}")


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _str(value) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


class Tracker:
    """One MLflow run of experiment "alignloop-reward", or nothing at all when disabled (--no-register)."""

    def __init__(self, tracking_uri: str, *, enabled: bool = True) -> None:
        self.uri, self.enabled = tracking_uri, enabled
        self.run_id: str | None = None

    @contextlib.contextmanager
    def run(self, *, run_name: str, params: dict, data: RewardData) -> Iterator[Tracker]:
        """The run around a training job: params and the dataset first, FAILED if the block raises."""
        if not self.enabled:
            yield self
            return
        import mlflow

        experiment_id = ensure_experiment(_client(self.uri), EXPERIMENT_NAME)
        tags = {"alignloop.kind": "reward-training", "alignloop.dataset_hash": data.hash}
        with tracking_uri(self.uri), \
                mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
            self.run_id = run.info.run_id
            mlflow.log_params({k: _str(v)[:6000] for k, v in params.items()})
            self._log_dataset(data)
            try:
                yield self
            finally:
                mlflow.flush_async_logging()

    def _log_dataset(self, data: RewardData) -> None:
        import mlflow

        with warnings.catch_warnings():
            # MLflow's own noise (see pipelines/feedback_export.py).
            for message in ("The specified dataset source can be interpreted",
                            "Series.values returning an ndarray that drops timezone",
                            "Hint: Inferred schema contains integer column"):
                warnings.filterwarnings("ignore", message=message)
            for context, table in data.inputs.items():
                dataset = mlflow.data.from_pandas(table.frame, source=table.source, digest=table.digest,
                                                  name=table.name)
                mlflow.log_input(dataset, context=context)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.enabled:
            import mlflow

            # Asynchronous: a step must not wait for a round trip to the tracking server.
            mlflow.log_metrics(metrics, step=step, synchronous=False)

    def log_metrics(self, metrics: dict[str, float | None]) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tags(tags)


def fetch_alias(settings: Settings, alias: str) -> tuple[ModelVersionRef, str]:
    """settings.reward_model_name@alias and its local folder."""
    ref = resolve_alias(settings.tracking_uri, settings.reward_model_name, alias)
    return ref, str(fetch_version(settings.tracking_uri, ref, settings.models_dir))


def register_and_gate(
    settings: Settings,
    tracker: Tracker,
    folder: Path,
    *,
    data: RewardData,
    eval_accuracy: float | None,
    score: Callable[[RewardModel, object], float | None],
    tolerance: float,
    untrained: bool,
    base_version: str | None,
    backbone: str,
    reward_shift: float,
    device: torch.device | str = "cpu",
    console: Console | None = None,
    promote: bool = True,
) -> dict:
    """Logs `folder` under the run's "model" path, registers it as a new version, scores the current champion
    with `score` and moves @champion to the new version if the gate says so. Returns the summary fields."""
    console = console or Console(stderr=True)
    # The alias the reward service serves (settings.reward_model_alias, "champion" by default).
    client = _client(settings.tracking_uri)
    name, alias = settings.reward_model_name, settings.reward_model_alias
    tags = {"alignloop.kind": "reward", "alignloop.dataset_hash": data.hash,
            "alignloop.dataset_source": data.source[:5000], "alignloop.dataset": data.name,
            "alignloop.backbone": backbone, "alignloop.eval_accuracy": _str(eval_accuracy),
            "alignloop.eval_pairs": str(data.eval_pairs), "alignloop.train_pairs": str(data.train_pairs),
            "alignloop.reward_shift": _str(reward_shift)}
    if base_version:
        tags["alignloop.base_reward_version"] = base_version
    if untrained:  # no optimizer step was taken: any trained model may replace it
        tags[UNTRAINED_TAG] = "true"
    with working(console, f"logging the model to MLflow at {settings.tracking_uri} and registering it"):
        mv = register_run_folder(settings, name, tracker.run_id, folder, tags=tags,
                                 description="Reward model trained by `alignloop reward train`.",
                                 model_description="The reward model (InstructGPT §3.5), trained on user "
                                                   "feedback.")

    try:
        champion = resolve_alias(settings.tracking_uri, name, alias)
    except ModelNotRegistered:
        champion = None
    champion_untrained = champion is not None and is_untrained(settings.tracking_uri, champion)
    champion_accuracy = None
    if champion is not None and not champion_untrained:
        with working(console, f"loading the champion (version {champion.version})"):
            champion_folder = fetch_version(settings.tracking_uri, champion, settings.models_dir)
            champion_model, champion_tokenizer = RewardModel.load(champion_folder, device=device)
        # Outside the spinner: `score` may show its own progress, and rich allows one live display at a time.
        champion_accuracy = score(champion_model, champion_tokenizer)
        del champion_model
    decision = decide(eval_accuracy, champion_accuracy, tolerance, has_champion=champion is not None,
                      champion_untrained=champion_untrained)
    # With promote=False the gate is decided and recorded, and a caller (the pipeline runner) moves the alias
    # later, together with the policy, so that a run that fails midway leaves every champion as it was.
    promoted = decision.promoted and promote
    if promoted:
        from pipelines import promotion

        promotion.promote(settings, name, str(mv.version), reason=f"reward gate: {decision.reason}", alias=alias)

    gate_tags = {"alignloop.promoted": str(promoted).lower(), "alignloop.gate_passed": str(decision.promoted).lower(),
                 "alignloop.gate": decision.reason,
                 "alignloop.gate_tolerance": _str(tolerance),
                 "alignloop.champion_version": champion.version if champion else "",
                 "alignloop.champion_eval_accuracy": _str(champion_accuracy),
                 "alignloop.champion_untrained": str(champion_untrained).lower()}
    for key, value in gate_tags.items():
        client.set_model_version_tag(name, mv.version, key, value)
    tracker.set_tags(gate_tags | {"alignloop.model_version": str(mv.version)})
    tracker.log_metrics({"champion_eval_accuracy": champion_accuracy, "promoted": float(promoted)})
    verdict = (f"[green]promoted to @{alias}[/]" if promoted else
               "[green]passed the gate[/] (not promoted: --no-promote)" if decision.promoted else
               "[yellow]not promoted[/]")
    console.print(f"{name} version {mv.version}: {verdict} ({decision.reason})")
    return {"model_version": str(mv.version), "promoted": promoted, "gate_passed": decision.promoted,
            "champion_eval_accuracy": champion_accuracy,
            "champion_version": champion.version if champion else None,
            "gate": decision.reason}
