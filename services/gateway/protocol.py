"""OpenAI-compatible request and response models of the gateway (no serving logic here)."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from alignloop.contracts import LOGIT_BIAS_MAX_ENTRIES


class ErrorInfo(BaseModel):
    # extra: alignloop adds fields of its own to some errors (a 409's run_id), beside OpenAI's four.
    model_config = ConfigDict(extra="allow")

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- requests -------------------------------------------------------------------------------------------


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: object) -> object:
        # Checked before the union, which would report an image part as "messages.0.content.0.type: Input
        # should be 'text'" and null as one error per branch: this says why (the model reads text only).
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise PydanticCustomError("content_type", "must be a string or a list of text parts")
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise PydanticCustomError(
                    "content_part_type",
                    "part {index} is not a text part ({kind}): this model reads text only",
                    {"index": i, "kind": f"type {kind!r}" if kind is not None else "no type"})
        return value

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    schema_: Annotated[dict, Field(alias="schema")]
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or JSON that satisfies a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs extension: exactly one constraint on the answer."""

    model_config = ConfigDict(populate_by_name=True)

    json_: dict | None = Field(None, alias="json")
    regex: Annotated[str, Field(min_length=1)] | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        if sum(v is not None for v in (self.json_, self.regex, self.choice)) != 1:
            raise ValueError("give exactly one of json, regex and choice")
        return self


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat request that alignloop serves; unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: list[str] = Field(default_factory=list, description="A string or a list of up to 4 strings.")
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    user: str | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    # Token id (a string in JSON, as OpenAI has it) -> bias added to its logit.
    logit_bias: dict[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    # vLLM's extensions: fixed-length generation (benchmarks, tests), and its sampling knobs beyond OpenAI's.
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    repetition_penalty: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    # vLLM's extension: where the request queues when the engine's batch is full, lower first. Unset: the
    # tenant's priority (`alignloop keys priority`); a request may defer itself, never go ahead of it.
    priority: Annotated[int, Field(ge=-(2**31), le=2**31 - 1)] | None = None
    # vLLM's extension: requests share prefix-cache blocks only with requests of the same salt (within the
    # tenant's own, unless the gateway shares the cache: services/gateway/cache_salt.py).
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    # Accepted only to be refused when they ask for something this server does not do (see unsupported()):
    # ignored, they would leave a client believing its model may call tools or speak.
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    functions: list[dict] | None = None
    modalities: list[str] | None = None
    audio: dict | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's extension; not with a JSON response_format
    # alignloop: best-of-n serving. Sample best_of answers, score each with the reward model, return the n best.
    best_of: Annotated[int, Field(ge=1)] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: object) -> object:
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list):
            raise PydanticCustomError("stop_type", "must be a string or a list of strings")
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_size(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        if v is not None and len(v) > LOGIT_BIAS_MAX_ENTRIES:
            raise ValueError(f"at most {LOGIT_BIAS_MAX_ENTRIES} tokens")
        return v

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for the first thing asked that this server does not do, or None."""
        if self.tools and self.tool_choice != "none":
            return "tools", "tool calls are not supported: this gateway serves text answers only"
        if self.functions:
            return "functions", "function calls are not supported: this gateway serves text answers only"
        if self.audio is not None or any(m != "text" for m in self.modalities or ()):
            return ("audio" if self.audio is not None else "modalities"), "only text output is supported"
        return None

    def constraint(self) -> dict | None:
        """The answer's constraint as one {kind: value} (the policy's StructuredOutput), or None: free text."""
        if self.structured_outputs is not None:
            so = self.structured_outputs
            return ({"json_schema": so.json_} if so.json_ is not None else
                    {"regex": so.regex} if so.regex is not None else {"choice": so.choice})
        if self.response_format is None or self.response_format.type == "text":
            return None
        if self.response_format.type == "json_object":
            return {"json_object": True}
        return {"json_schema": self.response_format.json_schema.schema_}

    def constraint_field(self) -> str:
        """The request field that set the constraint, to name in an error about it."""
        return "structured_outputs" if self.structured_outputs is not None else "response_format"

    def effective_max_tokens(self) -> int | None:
        # max_completion_tokens is OpenAI's newer name; it wins when both are given.
        return self.max_completion_tokens or self.max_tokens


# ---- responses ------------------------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None
    completion_id: str = Field(description="alignloop: what feedback on this choice refers to.")
    reward: float | None = Field(None, description="alignloop, best_of only: the reward model's score.")


class Candidate(BaseModel):
    """best_of only: one sampled answer, shown or not, best first. Those not shown can be fetched by nobody but
    are recorded, so the app can ask its user to rank them."""

    completion_id: str
    reward: float | None = Field(description="None: an empty answer, not scored (ranked last).")
    shown: bool


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Prompt tokens whose KV blocks the engine kept from earlier "
                                              "requests that began the same way (vLLM's prefix cache).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
        """A request's usage as OpenAI reports it: the prompt once, with its cached part, and every choice's
        tokens."""
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[Choice]
    usage: Usage
    # alignloop, best_of only: the reward model that ranked the answers, and every sampled answer, best first.
    reward_model: str | None = None
    candidates: list[Candidate] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    completion_id: str


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "alignloop"
    version: str | None = Field(None, description="alignloop: the registry version being served.")
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
