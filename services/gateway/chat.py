"""Chat completions: OpenAI request -> policy gRPC -> OpenAI response or SSE chunks, plus completion records."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from alignloop.grpc_channels import AFFINITY_HEADER
from alignloop.topics import ChatMessageV1, CompletionRecordV1, SamplingV1
from alignloop.v1 import policy_pb2 as pb
from alignloop.v1 import reward_pb2, reward_pb2_grpc
from services.gateway import metrics
from services.gateway.cache_salt import CacheScope, cache_salt
from services.gateway.completion_log import CompletionLog
from services.gateway.errors import ApiError, from_rpc_error
from services.gateway.protocol import (
    AssistantMessage,
    Candidate,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from services.gateway.routing import CHALLENGER, PolicyRouter, conversation_key
from services.gateway.streaming import ChunkRenderer, sse
from services.gateway.tracing import annotate

log = logging.getLogger("alignloop.gateway.chat")


# Sampling fields passed on only when the request sets them: unset, the policy service keeps vLLM's defaults.
OPTIONAL_SAMPLING = ("presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "min_p")


def to_policy_request(req: ChatCompletionRequest, request_id: str, priority: int = 0,
                      salt: str = "") -> pb.GenerateRequest:
    sampling = pb.SamplingParams(
        n=req.n,
        stop=req.stop,
        logprobs=req.logprobs,
        top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
    )
    if req.temperature is not None:
        sampling.temperature = req.temperature
    if req.top_p is not None:
        sampling.top_p = req.top_p
    if (max_tokens := req.effective_max_tokens()) is not None:
        sampling.max_tokens = max_tokens
    if req.seed is not None:
        sampling.seed = req.seed
    for name in OPTIONAL_SAMPLING:
        if (value := getattr(req, name)) is not None:
            setattr(sampling, name, value)
    if req.logit_bias:
        sampling.logit_bias.update(req.logit_bias)
    if (constraint := req.constraint()) is not None:
        [(kind, value)] = constraint.items()
        if kind == "json_schema":
            sampling.structured_output.json_schema = json.dumps(value)
        elif kind == "choice":
            sampling.structured_output.choice.values.extend(value)
        else:
            setattr(sampling.structured_output, kind, value)
    return pb.GenerateRequest(
        request_id=request_id,
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role=m.template_role(), content=m.text()) for m in req.messages]),
        sampling=sampling,
        priority=priority,
        cache_salt=salt,
    )


def to_openai_logprobs(items) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(lp.token.encode()),
                top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode())) for t in lp.top],
            )
            for lp in items
        ]
    )


def policy_error(exc: grpc.aio.AioRpcError, req: ChatCompletionRequest) -> ApiError:
    """The HTTP error for a failed policy call, naming the request's own field where the policy named its."""
    err = from_rpc_error(exc)
    if err.param == "structured_output" and req.constraint() is not None:
        err.param = req.constraint_field()
    return err


@dataclass
class _Turn:
    """What one chat request needs to answer and to log, whichever way it is served."""

    req: ChatCompletionRequest
    key_hash: str
    request_id: str | None = None  # the HTTP request's X-Request-Id
    spend: Callable[[int], None] | None = None  # takes the tokens the answer used from the tenant's rate limit
    response_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    received_at: float = field(default_factory=time.time)
    completion_ids: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.completion_ids = [f"cmpl-{uuid.uuid4().hex}" for _ in range(max(self.req.n, self.req.best_of or 0))]

    def span_attributes(self, model: pb.ModelRef, prompt_tokens: int, cached_tokens: int,
                        completion_tokens: int) -> dict:
        """What the request's trace span should say about its answer (OpenTelemetry's gen_ai names)."""
        return {"gen_ai.response.id": self.response_id, "gen_ai.request.model": model.name,
                "alignloop.model.version": model.version, "alignloop.completion_ids": self.completion_ids,
                "gen_ai.usage.input_tokens": prompt_tokens, "gen_ai.usage.cache_read.input_tokens": cached_tokens,
                "gen_ai.usage.output_tokens": completion_tokens}

    def record(self, index: int, text: str, finish: str | None, prompt_tokens: int, tokens: int, model: pb.ModelRef,
               *, cached_tokens: int = 0, reward: float | None = None, reward_model_version: str | None = None,
               shown: bool = True):
        req = self.req
        return CompletionRecordV1(
            completion_id=self.completion_ids[index],
            response_id=self.response_id,
            request_id=self.request_id,
            choice_index=index,
            messages=[ChatMessageV1(role=m.role, content=m.text()) for m in req.messages],
            response_text=text,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            completion_tokens=tokens,
            model_name=model.name,
            model_version=model.version,
            sampling=SamplingV1(
                temperature=req.temperature,
                top_p=req.top_p,
                max_tokens=req.effective_max_tokens(),
                stop=req.stop,
                seed=req.seed,
                n=req.n,
                best_of=req.best_of,
                **{name: getattr(req, name) for name in OPTIONAL_SAMPLING},
                logit_bias=req.logit_bias,
                structured_output=req.constraint(),
            ),
            api_key_hash=self.key_hash,
            stream=req.stream,
            created_at=self.received_at,
            finished_at=time.time(),
            reward=reward,
            reward_model_version=reward_model_version,
            shown=shown,
        )


@dataclass
class _Ranking:
    """best_of: the sampled answers, best first, and the rewards (by answer index) that ordered them."""

    order: list
    rewards: dict[int, float]
    version: str | None
    model: str | None

    def reward(self, answer) -> float | None:
        return self.rewards.get(answer.index)


def fingerprint(model: pb.ModelRef) -> str:
    return f"{model.name}/v{model.version}"


class ChatService:
    def __init__(self, router: PolicyRouter, completion_log: CompletionLog, timeout_s: float,
                 reward: reward_pb2_grpc.RewardServiceStub | None = None, *, affinity: bool = False,
                 cache_scope: CacheScope = "tenant") -> None:
        """`affinity`: the policy channels place calls by their `alignloop-affinity` header, which is then set
        from each request's conversation (alignloop/grpc_channels.py). `cache_scope`: whose prefix-cache blocks
        a request may reuse (services/gateway/cache_salt.py)."""
        self.router = router
        self.completion_log = completion_log
        self.timeout_s = timeout_s
        self.reward = reward
        self.affinity = affinity
        self.cache_scope = cache_scope

    def _metadata(self, turn: _Turn) -> tuple[tuple[str, str], ...] | None:
        if not self.affinity:
            return None
        req = turn.req
        # A generator: the key reads only the opening messages, not a long history's texts.
        key = conversation_key(turn.key_hash, req.user, ((m.role, m.text()) for m in req.messages))
        return ((AFFINITY_HEADER, key),)

    def _salt(self, turn: _Turn) -> str:
        return cache_salt(self.cache_scope, turn.key_hash, turn.req.cache_salt)

    async def _generate(self, generate: pb.GenerateRequest, turn: _Turn) -> pb.GenerateResponse:
        stub, role = self.router.choose(turn.key_hash, turn.req.user)
        metadata = self._metadata(turn)
        try:
            try:
                return await stub.Generate(generate, timeout=self.timeout_s, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                if role != CHALLENGER or not self.router.challenger_failed(exc):
                    raise
            return await self.router.champion.Generate(generate, timeout=self.timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise policy_error(exc, turn.req) from None

    async def _open_stream(self, generate: pb.GenerateRequest, turn: _Turn):
        """The open call and its first message (sent once the policy accepted the request)."""
        stub, role = self.router.choose(turn.key_hash, turn.req.user)
        metadata = self._metadata(turn)
        call = stub.GenerateStream(generate, timeout=self.timeout_s, metadata=metadata)
        try:
            try:
                return call, await call.read()
            except grpc.aio.AioRpcError as exc:
                if role != CHALLENGER or not self.router.challenger_failed(exc):
                    raise
            call = self.router.champion.GenerateStream(generate, timeout=self.timeout_s, metadata=metadata)
            return call, await call.read()
        except grpc.aio.AioRpcError as exc:
            raise policy_error(exc, turn.req) from None

    async def complete(self, req: ChatCompletionRequest, key_hash: str, request_id: str | None = None,
                       spend: Callable[[int], None] | None = None, priority: int = 0) -> ChatCompletionResponse:
        """All choices at once. With best_of, best_of answers are sampled in the same policy call, the reward
        service ranks them and the n best are returned; every sampled answer is recorded either way. `spend`
        gets the tokens used (prompt and completion); `priority` is the engine's scheduling priority."""
        if req.best_of and self.reward is None:
            raise ApiError(503, "best_of needs the reward service, which this gateway is not connected to",
                           "service_unavailable", param="best_of")
        turn = _Turn(req, key_hash, request_id, spend)
        generate = to_policy_request(req, turn.response_id, priority, self._salt(turn))
        if req.best_of:
            generate.sampling.n = req.best_of
        resp = await self._generate(generate, turn)
        answers = sorted(resp.completions, key=lambda c: c.index)
        ranking = await self._rank(req, answers) if req.best_of else None
        shown = ranking.order[:req.n] if ranking else answers
        shown_indices = {c.index for c in shown}
        for c in answers:
            self.completion_log.submit(turn.record(
                c.index, c.text, c.finish_reason or None, resp.prompt_tokens, len(c.token_ids), resp.model,
                cached_tokens=resp.cached_tokens, reward=ranking.reward(c) if ranking else None,
                reward_model_version=ranking.version if ranking else None, shown=c.index in shown_indices))
        # Every sampled answer cost tokens, shown or not.
        completion_tokens = sum(len(c.token_ids) for c in answers)
        metrics.count_tokens(resp.prompt_tokens, resp.cached_tokens, completion_tokens)
        if spend is not None:
            spend(resp.prompt_tokens + completion_tokens)
        annotate(lambda: turn.span_attributes(resp.model, resp.prompt_tokens, resp.cached_tokens,
                                              completion_tokens))
        return ChatCompletionResponse(
            id=turn.response_id,
            created=int(turn.received_at),
            model=resp.model.name,
            system_fingerprint=fingerprint(resp.model),
            choices=[
                Choice(index=i, message=AssistantMessage(content=c.text),
                       logprobs=to_openai_logprobs(c.logprobs) if req.logprobs else None,
                       finish_reason=c.finish_reason or None, completion_id=turn.completion_ids[c.index],
                       reward=ranking.reward(c) if ranking else None)
                for i, c in enumerate(shown)
            ],
            usage=Usage.of(resp.prompt_tokens, completion_tokens, resp.cached_tokens),
            reward_model=ranking.model if ranking else None,
            candidates=None if ranking is None else [
                Candidate(completion_id=turn.completion_ids[c.index], reward=ranking.reward(c),
                          shown=c.index in shown_indices)
                for c in ranking.order
            ],
        )

    async def _rank(self, req: ChatCompletionRequest, answers: list) -> _Ranking:
        """Scores the answers with the reward service; best first, empty answers (unscorable) last."""
        conversation = [pb.ChatMessage(role=m.template_role(), content=m.text()) for m in req.messages]
        scorable = [c for c in answers if c.text]  # the reward service refuses an empty response
        if not scorable:
            return _Ranking(order=answers, rewards={}, version=None, model=None)
        try:
            scored = await self.reward.Score(
                reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(messages=conversation, response=c.text)
                                               for c in scorable]),
                timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            err = from_rpc_error(exc)
            raise ApiError(err.status_code, f"reward service: {exc.details() or exc.code().name}", err.type,
                           param="best_of") from None
        rewards = {c.index: r for c, r in zip(scorable, scored.rewards)}
        order = sorted(answers, key=lambda c: (c.index not in rewards, -rewards.get(c.index, 0.0)))
        return _Ranking(order=order, rewards=rewards, version=scored.model.version,
                        model=f"{scored.model.name}/v{scored.model.version}")

    async def stream(self, req: ChatCompletionRequest, key_hash: str, request_id: str | None = None,
                     spend: Callable[[int], None] | None = None, priority: int = 0) -> AsyncIterator[bytes]:
        """Opens the stream and waits for the policy to accept the request (its first message comes before any
        token), so that a bad request still gets a 4xx status; returns the server-sent events that follow.
        `spend` gets the tokens used once the stream ends, however it ends."""
        turn = _Turn(req, key_hash, request_id, spend)
        call, first = await self._open_stream(
            to_policy_request(req, turn.response_id, priority, self._salt(turn)), turn)
        if first is grpc.aio.EOF:
            raise ApiError(502, "the policy service closed the stream without an answer", "api_error")
        return self._events(turn, call, first)

    async def _events(self, turn: _Turn, call, first: pb.GenerateStreamResponse) -> AsyncIterator[bytes]:
        req = turn.req
        model = first.model
        prompt_tokens = first.prompt_tokens
        cached_tokens = 0
        # Each answer's pieces, joined once it ends (`+=` on a list item copies the text so far at every token).
        texts: list[list[str]] = [[] for _ in range(req.n)]
        tokens = [0] * req.n
        render = ChunkRenderer(turn.response_id, int(turn.received_at), model.name, fingerprint(model),
                               turn.completion_ids[:req.n])

        try:
            for i in range(req.n):
                yield render.role(i)
            first_token_seen = False
            msg = first
            while msg is not grpc.aio.EOF:
                cached_tokens = msg.cached_tokens or cached_tokens  # set on one message only
                for d in msg.deltas:
                    if not first_token_seen and d.token_ids:
                        metrics.TTFT.observe(time.time() - turn.received_at)
                        first_token_seen = True
                    texts[d.index].append(d.text)
                    tokens[d.index] += len(d.token_ids)
                    finish = d.finish_reason or None
                    # Empty text with tokens happens mid-way through a multi-byte character: nothing to show,
                    # unless the client wants those tokens' logprobs.
                    if not (d.text or finish or (req.logprobs and d.logprobs)):
                        continue
                    if not finish and not req.logprobs:
                        yield render.content(d.index, d.text)  # the per-token event, from the template
                        continue
                    yield render.chunk([ChunkChoice(
                        index=d.index,
                        delta=DeltaMessage(content=d.text),
                        logprobs=to_openai_logprobs(d.logprobs) if req.logprobs else None,
                        finish_reason=finish,
                        completion_id=turn.completion_ids[d.index],
                    )])
                    if finish:
                        self.completion_log.submit(turn.record(d.index, "".join(texts[d.index]), finish,
                                                               prompt_tokens, tokens[d.index], model,
                                                               cached_tokens=cached_tokens))
                msg = await call.read()
            metrics.count_tokens(prompt_tokens, cached_tokens, sum(tokens))
            annotate(lambda: turn.span_attributes(model, prompt_tokens, cached_tokens, sum(tokens)))
            if req.stream_options and req.stream_options.include_usage:
                yield render.chunk([], Usage.of(prompt_tokens, sum(tokens), cached_tokens))
            yield sse("[DONE]")
        except grpc.aio.AioRpcError as exc:
            # Headers are gone already: report in-band, as OpenAI and vLLM do, then end the stream.
            yield sse(json.dumps(from_rpc_error(exc).body()))
            yield sse("[DONE]")
        except Exception:
            log.exception("stream %s (request %s) failed", turn.response_id, turn.request_id)
            yield sse(json.dumps(ApiError(500, "internal error while streaming", "api_error").body()))
            yield sse("[DONE]")
        finally:
            # Covers the client going away: cancelling the call makes the policy service abort the engine request.
            call.cancel()
            if turn.spend is not None:
                turn.spend(prompt_tokens + sum(tokens))
