"""Kafka topics and their versioned record schemas: the contract between producers and consumers.

A breaking change to a schema gets a new topic (`...v2`); additive, optional fields may be added in place.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

COMPLETIONS_V1 = "alignloop.completions.v1"


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


class CompletionRecordV1(BaseModel):
    """One served choice. `completion_id` is what later feedback points at; it is also the record key."""

    schema_name: str = COMPLETIONS_V1
    completion_id: str
    response_id: str
    choice_index: int
    messages: list[ChatMessageV1]
    response_text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    model_name: str
    model_version: str
    sampling: SamplingV1
    api_key_hash: str
    stream: bool
    created_at: float = Field(description="Unix seconds when the gateway received the request.")
    finished_at: float = Field(description="Unix seconds when the choice finished.")
