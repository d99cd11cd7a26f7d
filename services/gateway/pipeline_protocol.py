"""Public request and response models of the operator's pipeline routes (/v1/admin/pipelines/...), mirroring
PipelineRun and PipelineStep of proto/alignloop/v1/pipeline.proto: times are ISO-8601 UTC strings (null
before they happen) and the JSON strings are objects."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_REASON_CHARS = 500
LIST_LIMIT_DEFAULT = 20
LIST_LIMIT_MAX = 200


# ---- requests -------------------------------------------------------------------------------------------


class StartRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, StringConstraints(max_length=MAX_REASON_CHARS)] = Field(
        "", description="Free text kept with the run: why it was started.")
    config: dict[str, Any] | None = Field(
        None, description="Per-run overrides of the runner's step settings (services/pipeline/config.py).")


# ---- responses ------------------------------------------------------------------------------------------


class PipelineStep(BaseModel):
    name: str = Field(description="snapshot | reward_train | reward_gate | ppo | policy_gate | promote | "
                                  "serving")
    status: str = Field(description="pending | running | succeeded | failed | skipped | cancelled")
    started_at: str | None = None
    finished_at: str | None = None
    detail: str = Field("", description="What it did, why it was skipped, or why it failed, in one line.")
    log_path: str | None = Field(None, description="The step's log on the runner's machine.")
    mlflow_run_id: str | None = None
    summary: dict[str, Any] = Field(default_factory=dict, description="The step's figures.")
    progress: float = Field(0.0, description="0..1 where the step reports it (PPO iterations), else 0 or 1.")


class PipelineRun(BaseModel):
    id: str
    object: Literal["pipeline.run"] = "pipeline.run"
    status: str = Field(description="queued | running | succeeded | failed | cancelled; a run that a gate "
                                    "stopped before promotion succeeded (see outcome)")
    trigger: str = Field(description="operator | schedule | feedback")
    reason: str = ""
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    steps: list[PipelineStep] = Field(default_factory=list)
    mlflow_run_id: str | None = Field(None, description="The parent run, in experiment alignloop-pipeline.")
    error: str | None = Field(None, description="Why it failed or was cancelled.")
    outcome: str | None = Field(None, description='e.g. "promoted alignloop-policy v3", "not promoted: ..."')
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="The step settings it ran with: defaults and its overrides.")
    requested_by: str | None = Field(None, description="A hash of the API key that started it.")
    promoted_policy_version: str | None = None
    promoted_reward_version: str | None = None


class PipelineRunList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PipelineRun] = Field(description="Newest first.")
