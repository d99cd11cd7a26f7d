"""Kafka topics and their versioned record schemas: the contract between producers and consumers.

A breaking change to a schema gets a new topic (`...v2`); additive, optional fields may be added in place.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, Field

COMPLETIONS_V1 = "alignloop.completions.v1"
FEEDBACK_V1 = "alignloop.feedback.v1"

FeedbackKindV1 = Literal["thumbs", "rating", "ranking", "comparison"]


class ChatMessageV1(BaseModel):
    role: str
    content: str


class SamplingV1(BaseModel):
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    n: int = 1
    best_of: int | None = None  # best-of-n serving: this many were sampled, the n best by reward returned
    # Set only when the request set them (records written before they were added have none).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    logit_bias: dict[int, float] | None = None
    # The answer's constraint, as {kind: value}: {"json_object": true}, {"json_schema": {...}}, {"regex": "..."}
    # or {"choice": [...]}; None: free text.
    structured_output: dict[str, Any] | None = None


def prompt_hash(messages: list[ChatMessageV1]) -> str:
    """Identifies a prompt: two completions answer the same prompt when their messages are equal."""
    canonical = json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class CompletionRecordV1(BaseModel):
    """One served choice. `completion_id` is what later feedback points at; it is also the record key."""

    schema_name: str = COMPLETIONS_V1
    completion_id: str
    response_id: str
    # The HTTP request's X-Request-Id (the caller's, or the gateway's when it sent none); None in records
    # written before it was added.
    request_id: str | None = None
    choice_index: int
    messages: list[ChatMessageV1]
    response_text: str
    finish_reason: str | None
    prompt_tokens: int
    # Of prompt_tokens, those found in the engine's prefix cache; None in records written before it was added.
    cached_tokens: int | None = None
    completion_tokens: int
    model_name: str
    model_version: str
    sampling: SamplingV1
    api_key_hash: str
    stream: bool
    created_at: float = Field(description="Unix seconds when the gateway received the request.")
    finished_at: float = Field(description="Unix seconds when the choice finished.")
    # Best-of-n serving only: the reward model's score, which version gave it, and whether the user was shown
    # this answer. The answers not shown are recorded too: with their rewards they make ready ranking tasks.
    reward: float | None = None
    reward_model_version: str | None = None
    shown: bool = True


class FeedbackRecordV1(BaseModel):
    """One accepted piece of feedback, after the collector validated it. Keyed by `feedback_id`, so retries of
    the same feedback land on the same partition and the store's unique key drops the redelivered copies."""

    schema_name: str = FEEDBACK_V1
    feedback_id: str
    client_feedback_id: str | None = None
    # The X-Request-Id of the HTTP request that carried it; None in records written before it was added.
    request_id: str | None = None
    request_hash: str = Field(description="Hash of what the client sent; tells a replay from a conflict.")
    api_key_hash: str
    kind: FeedbackKindV1
    completion_ids: list[str] = Field(description="thumbs/rating: one; ranking: best first; comparison: as shown.")
    thumbs_up: bool | None = None
    rating: int | None = None
    preferred_completion_id: str | None = None
    comment: str | None = None
    correction: str | None = None
    fails_instruction: bool = False
    hallucination: bool = False
    inappropriate: bool = False
    # Copied from the completion records at validation time, so analytics need no join.
    prompt_hash: str
    model_name: str
    model_versions: list[str] = Field(description="The model version of each completion, in the same order.")
    created_at: float = Field(description="Unix seconds when the gateway received the feedback.")
    accepted_at: float = Field(description="Unix seconds when the collector validated it.")
