"""Builds the vLLM engine that serves the policy, and turns requests into engine inputs."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alignloop.config import Settings, serving_dtype, vllm_serving_environment
from alignloop.contracts import LOGIT_BIAS_MAX_ENTRIES
from alignloop.v1 import policy_pb2 as pb


class InvalidRequest(ValueError):
    """A request the engine cannot serve; `param` names the offending field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def build_engine(settings: Settings, model_dir: Path, served_name: str):
    """An AsyncLLM over `model_dir` with the settings' engine knobs."""
    if not cuda_available():
        for k, v in vllm_serving_environment(settings).items():
            os.environ.setdefault(k, v)

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(model_dir),
        served_model_name=served_name,
        max_model_len=settings.max_model_len,
        enforce_eager=settings.enforce_eager,
        dtype=serving_dtype(settings.dtype),
        max_num_seqs=settings.max_num_seqs,
        stream_interval=settings.stream_interval,
        scheduling_policy=settings.scheduling_policy,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        disable_log_stats=not settings.engine_stats,
        otlp_traces_endpoint=settings.otlp_traces_endpoint,
    )
    # The engine is not bound to a local: when vLLM is first imported here, something in that import keeps
    # this frame (and its locals) alive for the life of the process, and the engine must be free to go when
    # its owner drops it.
    try:
        return AsyncLLM.from_engine_args(args)
    finally:
        freeze_vllm_environment()


def freeze_vllm_environment() -> None:
    """From now on vLLM reads its `VLLM_*` environment variables from a cache, not from the environment.

    vLLM reads some of them for every output it hands on, each an `os.getenv` and a conversion. Its engine core
    and workers cache them once started; its front end, this process, does not. Ours are all set before the
    engine is built (above) and never changed after, so a cache changes nothing but the cost: about 7% of the
    front end's CPU per token (benchmarks/engine_front_end.py).
    """
    from vllm import envs

    envs.enable_envs_cache()


def engine_input(engine, prompt_token_ids: list[int], cache_salt: str = ""):
    """`prompt_token_ids` as the engine's input, rendered by its own renderer, as vLLM's server renders a prompt.
    A `cache_salt` keeps its prefix-cache blocks apart from those of requests without the same salt.

    AsyncLLM.generate still takes a bare `{"prompt_token_ids": ...}` dict, but deprecated: it renders such a
    prompt on a thread pool, one hop per request. A tokenised prompt costs next to nothing to render, so it
    is rendered here, on the caller's loop.
    """
    prompt = {"prompt_token_ids": prompt_token_ids}
    if cache_salt:
        prompt["cache_salt"] = cache_salt
    (rendered,) = engine.renderer.render_cmpl([prompt])
    return rendered


@dataclass(frozen=True)
class PreparedRequest:
    prompt_token_ids: list[int]
    sampling_params: object  # vllm.SamplingParams


def vllm_checks(engine) -> Callable[[object], None]:
    """vLLM's own checks of a request's SamplingParams, as `engine` runs them when it takes the request (the
    structured-output constraint compiled by its backend, token ids against the vocabulary, ...)."""
    processor = engine.input_processor

    def verify(params) -> None:
        params.verify(processor.model_config, processor.speculative_config, processor.structured_outputs_config,
                      processor.tokenizer)

    return verify


def prepare(request: pb.GenerateRequest, tokenizer, max_model_len: int, *, stream: bool,
            verify: Callable[[object], None] | None = None) -> PreparedRequest:
    """Validates a request against the model's context and builds the engine's inputs.

    Tokenising here (not in the engine) lets us name the offending field when the prompt does not fit.
    """
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind

    which = request.WhichOneof("input")
    if which == "chat":
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        if not messages:
            raise InvalidRequest("messages must not be empty", "messages")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        param = "messages"
    elif which == "prompt":
        text, param = request.prompt, "prompt"
    else:
        raise InvalidRequest("one of chat or prompt is required", "messages")
    prompt_ids = tokenizer.encode(text, add_special_tokens=which == "prompt")
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty", param)

    room = max_model_len - len(prompt_ids)
    if room <= 0:
        raise InvalidRequest(
            f"the prompt has {len(prompt_ids)} tokens; this model's context is {max_model_len} tokens", param
        )
    s = request.sampling
    max_tokens = s.max_tokens if s.HasField("max_tokens") else room
    if max_tokens <= 0:
        raise InvalidRequest("max_tokens must be at least 1", "max_tokens")
    if max_tokens > room:
        raise InvalidRequest(
            f"max_tokens={max_tokens} plus the prompt's {len(prompt_ids)} tokens exceed this model's context "
            f"of {max_model_len} tokens",
            "max_tokens",
        )
    temperature = s.temperature if s.HasField("temperature") else 1.0
    if temperature < 0:
        raise InvalidRequest("temperature must be >= 0", "temperature")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise InvalidRequest("top_p must be in (0, 1]", "top_p")

    constraint = structured_outputs(s)
    knobs = penalties(s, len(tokenizer))
    try:
        params = SamplingParams(
            n=max(1, s.n),
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            stop=list(s.stop) or None,
            seed=s.seed if s.HasField("seed") else None,
            logprobs=s.top_logprobs if s.logprobs else None,
            ignore_eos=s.ignore_eos,
            min_tokens=min(s.min_tokens, max_tokens),
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            structured_outputs=constraint,
            **knobs,
        )
        if verify is not None:
            # Here, not when the engine takes the request: by then a stream has told its caller the request
            # was accepted, and a refusal could only come in-band, without the field's name.
            verify(params)
    except (VLLMValidationError, ValueError) as exc:
        param = getattr(exc, "parameter", None) or ("structured_output" if constraint is not None else "sampling")
        raise InvalidRequest(str(exc.args[0]) if exc.args else str(exc), param) from None
    return PreparedRequest(prompt_token_ids=prompt_ids, sampling_params=params)


def structured_outputs(s: pb.SamplingParams):
    """The vLLM StructuredOutputsParams of `s`'s constraint, or None for free text."""
    from vllm.sampling_params import StructuredOutputsParams

    kind = s.structured_output.WhichOneof("constraint") if s.HasField("structured_output") else None
    if kind is None:
        return None
    so = s.structured_output
    if kind == "json_object":
        if not so.json_object:
            raise InvalidRequest("structured_output.json_object must be true if set", "structured_output")
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        try:
            schema = json.loads(so.json_schema)
        except ValueError as exc:
            raise InvalidRequest(f"the JSON schema is not valid JSON: {exc}", "structured_output") from None
        if not isinstance(schema, dict):
            raise InvalidRequest("the JSON schema must be a JSON object", "structured_output")
        return StructuredOutputsParams(json=schema)
    if kind == "regex":
        return StructuredOutputsParams(regex=so.regex)
    if not so.choice.values:
        raise InvalidRequest("choice must list at least one string", "structured_output")
    return StructuredOutputsParams(choice=list(so.choice.values))


def penalties(s: pb.SamplingParams, vocab_size: int) -> dict:
    """The penalties, top_k, min_p and logit_bias of `s` as SamplingParams arguments, checked here so that a bad
    one is refused naming its field: vLLM's own refusals of most of them name none."""
    args = {}
    for name, low, high in (("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0),
                            ("min_p", 0.0, 1.0)):
        if s.HasField(name):
            value = getattr(s, name)
            if not low <= value <= high:  # also refuses NaN
                raise InvalidRequest(f"{name} must be in [{low:g}, {high:g}]", name)
            args[name] = value
    if s.HasField("repetition_penalty"):
        if not 0 < s.repetition_penalty < math.inf:
            raise InvalidRequest("repetition_penalty must be a finite number > 0", "repetition_penalty")
        args["repetition_penalty"] = s.repetition_penalty
    if s.HasField("top_k"):
        if s.top_k < -1:
            raise InvalidRequest("top_k must be at least 1, or 0 or -1 for no limit", "top_k")
        args["top_k"] = max(s.top_k, 0)
    if s.logit_bias:
        if len(s.logit_bias) > LOGIT_BIAS_MAX_ENTRIES:
            raise InvalidRequest(f"logit_bias may name at most {LOGIT_BIAS_MAX_ENTRIES} tokens", "logit_bias")
        for token_id, bias in s.logit_bias.items():
            if not 0 <= token_id < vocab_size:
                raise InvalidRequest(f"logit_bias: token id {token_id} is not in this model's vocabulary "
                                     f"(ids 0 to {vocab_size - 1})", "logit_bias")
            if not -100 <= bias <= 100:
                raise InvalidRequest(f"logit_bias: the bias of token {token_id} must be in [-100, 100]",
                                     "logit_bias")
        args["logit_bias"] = dict(s.logit_bias)
    return args


def completion_message(output, *, with_logprobs: bool, top_k: int) -> pb.Completion:
    """vLLM CompletionOutput (whole or delta) -> proto Completion."""
    msg = pb.Completion(
        index=output.index,
        text=output.text,
        token_ids=list(output.token_ids),
        finish_reason=output.finish_reason or "",
    )
    if with_logprobs and output.logprobs:
        for token_id, position in zip(output.token_ids, output.logprobs):
            chosen = position[token_id]
            # vLLM's dict holds the k best plus the sampled token, which may rank below them.
            top = sorted((item for item in position.items() if item[1].rank <= top_k), key=lambda i: i[1].rank)
            msg.logprobs.append(
                pb.TokenLogprob(
                    token_id=token_id,
                    token=chosen.decoded_token or "",
                    logprob=chosen.logprob,
                    top=[pb.TopLogprob(token_id=t, token=lp.decoded_token or "", logprob=lp.logprob) for t, lp in top],
                )
            )
    return msg
