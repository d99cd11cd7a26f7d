"""What a run's steps are run with: the runner's defaults (ALIGNLOOP_PIPELINE_DEFAULTS) with the run's own
overrides on top. Hyper-parameter keys are the flags of the step's command, spelt as the dataclass fields
(`{"ppo": {"iterations": 4, "beta": 0.02}}` → `ppo train --iterations 4 --beta 0.02`); unknown keys are
refused before anything starts, naming the key."""

from __future__ import annotations

import json
from dataclasses import fields

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Scalar = bool | int | float | str

# `alignloop reward train` flags the runner may pass (the rest belong to the runner: --snapshot, --out, ...).
REWARD_KEYS = frozenset({"backbone", "epochs", "lr", "batch_size", "max_length", "pointwise_weight",
                         "freeze_layers", "seed", "eval_fraction", "limit", "eval_limit", "gate_tolerance"})
EVALUATE_KEYS = frozenset({"max_prompts", "samples_per_prompt", "max_new_tokens", "min_win_rate",
                           "min_reward_gain", "max_kl", "seed"})


def _ppo_keys() -> frozenset[str]:
    from pipelines.ppo.args import Args  # the dataclass only: no torch

    return frozenset(f.name for f in fields(Args))


class ConfigError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class RunConfig(BaseModel):
    """The step settings of one run."""

    model_config = ConfigDict(extra="forbid")

    reward: dict[str, Scalar] = Field(default_factory=dict)  # `reward train` hyper-parameters
    ppo: dict[str, Scalar] = Field(default_factory=dict)  # `ppo train` hyper-parameters (pipelines/ppo/args.py)
    evaluate: dict[str, Scalar] = Field(default_factory=dict)  # `ppo evaluate` gates and sampling
    # Fewer preference pairs than this in the snapshot: the RM is not retrained (the champion RM scores PPO).
    min_pairs: int = Field(20, ge=0)
    # PPO worker processes on this machine (torchrun --nproc_per_node); 1 runs without torchrun.
    nproc_per_node: int = Field(1, ge=1, le=64)
    # Prompts mixed with the users' own (a JSON-lines file on the runner's machine).
    prompt_file: str | None = None
    # How long the serving step waits for the services to report the promoted versions.
    serving_timeout_s: float = Field(300.0, gt=0)
    # Per-step wall-clock limit; a step still running then is killed and the run fails.
    step_timeout_s: float = Field(6 * 3600.0, gt=0)
    # Skip RM training even with enough pairs (PPO against the champion RM).
    skip_reward: bool = False
    # The RM gate's floor: a new RM below this held-out accuracy is refused even when the champion is the
    # untrained placeholder (PPO against a worse-than-chance RM would climb the wrong way).
    reward_min_accuracy: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("reward")
    @classmethod
    def _reward_keys(cls, v: dict) -> dict:
        return _known(v, REWARD_KEYS)

    @field_validator("ppo")
    @classmethod
    def _ppo_keys(cls, v: dict) -> dict:
        return _known(v, _ppo_keys())

    @field_validator("evaluate")
    @classmethod
    def _evaluate_keys(cls, v: dict) -> dict:
        return _known(v, EVALUATE_KEYS)


def _known(values: dict, allowed: frozenset[str]) -> dict:
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    return values


def merge(base: dict, override: dict) -> dict:
    """`override` on top of `base`, one level of sections deep (a section's keys merge, scalars replace)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _parse(text: str, what: str) -> dict:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError("config", f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError("config", f"{what} must be a JSON object")
    return value


def resolve(defaults_json: str, overrides_json: str) -> RunConfig:
    """The run's config, or ConfigError naming the offending key as config.SECTION.KEY."""
    merged = merge(_parse(defaults_json, "ALIGNLOOP_PIPELINE_DEFAULTS"), _parse(overrides_json, "config"))
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(["config", *(str(p) for p in err["loc"])])
        raise ConfigError(param, f"{param}: {err['msg']}") from None


def flags(values: dict[str, Scalar]) -> list[str]:
    """--key value pairs of a command line (booleans as --key / --no-key)."""
    argv: list[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv
