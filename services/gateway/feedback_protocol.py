"""Public request and response models of the feedback routes (kinds as in InstructGPT's labeling setup)."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationInfo, field_validator
from pydantic import Strict as StrictType

CompletionId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
ClientKey = Annotated[str, StringConstraints(min_length=1, max_length=255)]

KINDS = ("thumbs", "rating", "ranking", "comparison")


class FeedbackFlags(BaseModel):
    """InstructGPT's per-answer metadata labels."""

    model_config = ConfigDict(extra="forbid")
    fails_instruction: bool = False
    hallucination: bool = False
    inappropriate: bool = False


class _FeedbackBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The client's own id for this feedback; doubles as its idempotency key.
    feedback_id: ClientKey | None = None
    comment: str | None = None
    # The answer the user wanted instead: a demonstration for supervised fine-tuning.
    correction: str | None = None
    flags: FeedbackFlags = Field(default_factory=FeedbackFlags)

    def content_hash(self) -> str:
        """Identifies what was said, apart from the client's key: tells a replay from a conflicting reuse."""
        return stable_hash(self.model_dump(mode="json", exclude={"feedback_id"}))


class ThumbsFeedback(_FeedbackBase):
    kind: Literal["thumbs"]
    completion_id: CompletionId
    value: Literal["up", "down"]


class RatingFeedback(_FeedbackBase):
    kind: Literal["rating"]
    completion_id: CompletionId
    value: Annotated[int, StrictType(), Field(ge=1, le=7)]  # 1 (worst) .. 7 (best), as InstructGPT's Likert scale


def _distinct(ids: list[str]) -> list[str]:
    if len(set(ids)) != len(ids):
        raise ValueError("completion ids must be distinct")
    return ids


class RankingFeedback(_FeedbackBase):
    kind: Literal["ranking"]
    completion_ids: list[CompletionId] = Field(min_length=2, description="best first")

    # Field validators, so that an error's location is the field itself.
    _distinct_ids = field_validator("completion_ids")(_distinct)


class ComparisonFeedback(_FeedbackBase):
    kind: Literal["comparison"]
    completion_ids: list[CompletionId] = Field(min_length=2, max_length=2)
    preferred: CompletionId

    _distinct_ids = field_validator("completion_ids")(_distinct)

    @field_validator("preferred")
    @classmethod
    def _preferred_is_shown(cls, v: str, info: ValidationInfo) -> str:
        ids = info.data.get("completion_ids")
        if ids is not None and v not in ids:  # (ids is None: they failed validation, reported on their own)
            raise ValueError("preferred must be one of completion_ids")
        return v


FeedbackItem = Annotated[ThumbsFeedback | RatingFeedback | RankingFeedback | ComparisonFeedback,
                         Field(discriminator="kind")]


class FeedbackBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[FeedbackItem] = Field(min_length=1)


FEEDBACK_ITEM = TypeAdapter(FeedbackItem)
FEEDBACK_BATCH = TypeAdapter(FeedbackBatch)


class FeedbackResult(BaseModel):
    object: Literal["feedback"] = "feedback"
    feedback_id: str
    client_feedback_id: str | None = None
    kind: str
    completion_ids: list[str]
    created: int = Field(description="Unix seconds when the feedback was first accepted.")


class FeedbackBatchResult(BaseModel):
    object: Literal["list"] = "list"
    data: list[FeedbackResult]


class StatsEntry(BaseModel):
    total: int = 0
    thumbs_up: int = 0
    thumbs_down: int = 0
    thumbs_up_rate: float | None = Field(None, description="up / (up + down); null without thumbs")
    ratings: int = 0
    rating_mean: float | None = None
    rankings: int = 0
    comparisons: int = 0
    corrections: int = 0
    flagged: int = 0


class ModelVersionStats(StatsEntry):
    model_name: str
    model_version: str


class DayStats(StatsEntry):
    day: str


class ModelVersionDayStats(StatsEntry):
    model_name: str
    model_version: str
    day: str


class FeedbackStats(BaseModel):
    object: Literal["feedback.stats"] = "feedback.stats"
    days: int
    by_model_version: list[ModelVersionStats]
    by_day: list[DayStats]
    by_model_version_and_day: list[ModelVersionDayStats]


def stable_hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]
