"""HTTP models of the model-version routes (/v1/admin/models/...): versions side by side, canary, promotion."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.gateway.feedback_protocol import StatsEntry


class CanaryState(BaseModel):
    version: str | None = Field(None, description="The challenger (alias `challenger`); null: no canary.")
    percent: int = Field(0, description="Its share of chat traffic in the registry.")
    serving: bool = Field(False, description="Whether the canary policy service is answering with it now.")


class ModelVersionEntry(BaseModel):
    version: str
    aliases: list[str]
    created_at: str | None
    run_id: str | None = Field(None, description="The MLflow run that logged it.")
    traffic_percent: int = Field(description="Share of chat traffic it gets now (champion: the rest).")
    responses: int = Field(0, description="Chat requests it answered in the period.")
    completions: int = Field(0, description="Choices it generated in the period (n, best_of).")
    feedback: StatsEntry = Field(description="Feedback on its answers in the period.")
    tags: dict[str, str]


class ModelVersionList(BaseModel):
    object: Literal["list"] = "list"
    model: str
    days: int = Field(description="The period the counts cover: the last N UTC days; 0: all time.")
    champion: str | None
    canary: CanaryState
    data: list[ModelVersionEntry] = Field(description="Newest first.")


class SetCanaryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=32)
    percent: int = Field(ge=0, le=100, description="Share of chat traffic for the challenger.")
    reason: str = Field("", max_length=2000)


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=32)
    model: str | None = Field(None, description="Registered model; default: the policy.")
    reason: str = Field("", max_length=2000)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Registered model; default: the policy.")


class ModelAliases(BaseModel):
    object: Literal["model.aliases"] = "model.aliases"
    model: str
    champion: str | None
    challenger: str | None
    canary_percent: int
    previous_champion: str | None = None
