"""The gateway's FastAPI app: OpenAI-compatible /v1 routes, health, metrics; web.py adds the pages."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from contextlib import asynccontextmanager
from typing import Annotated

import grpc
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from alignloop import tracing
from alignloop.config import Settings
from alignloop.credentials import Limits
from alignloop.grpc_channels import balanced_channel, retrying_channel
from alignloop.kafka_admin import ensure_topics
from alignloop.v1 import feedback_pb2 as feedback_pb
from alignloop.v1 import feedback_pb2_grpc as feedback_grpc
from alignloop.v1 import pipeline_pb2_grpc as pipeline_grpc
from alignloop.v1 import policy_pb2 as pb
from alignloop.v1 import policy_pb2_grpc as pb_grpc
from alignloop.v1 import reward_pb2_grpc as reward_grpc
from services.gateway import metrics, web
from services.gateway.admission import Admission, ReleaseAdmitted
from services.gateway.auth import Caller, KeyRing
from services.gateway.chat import ChatService
from services.gateway.completion_log import CompletionLog
from services.gateway.errors import ApiError, from_rpc_error
from services.gateway.feedback import IDEMPOTENCY_HEADER, FeedbackApi
from services.gateway.feedback_protocol import FeedbackBatchResult, FeedbackResult, FeedbackStats
from services.gateway.model_protocol import (
    ModelAliases,
    ModelVersionList,
    PromoteRequest,
    RollbackRequest,
    SetCanaryRequest,
)
from services.gateway.models_api import ModelsApi
from services.gateway.pipeline_protocol import (
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    PipelineRun,
    PipelineRunList,
    StartRunRequest,
)
from services.gateway.pipelines import PipelineApi
from services.gateway.protocol import ChatCompletionRequest, ModelCard, ModelList
from services.gateway.rate_limits import LocalBuckets, RateLimiter, RedisBuckets
from services.gateway.request_id import RequestIds, request_id
from services.gateway.routing import PolicyRouter
from services.gateway.tracing import TracingMiddleware, propagate_trace
from services.gateway.usage import UsageReport, usage_report

log = logging.getLogger("alignloop.gateway")


# pydantic's name for a branch of a union it tried ("str", "list[TextContentPart]"): a type, not a field.
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|bytes|dict|list|none|[a-z_-]+\[.*\])$")


def _field_path(err: dict) -> list[str]:
    """The request field an error is about: its location less FastAPI's prefixes and union branches."""
    return [str(p) for p in err.get("loc", ())
            if p not in ("body", "query", "[key]") and not (isinstance(p, str) and _UNION_BRANCH.match(p))]


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    if errors[0].get("type") == "json_invalid":
        return ApiError(400, f"The request body is not valid JSON: {errors[0].get('msg')}", param="body")
    # The first field in error, as pydantic lists them. A value that no branch of a union accepts fails once
    # per branch; of its errors, the deepest says what is wrong inside it (a text part without its text), not
    # that it is not a string.
    first = _field_path(errors[0])
    path = max((p for p in map(_field_path, errors) if p[:len(first)] == first), key=len)
    # Branches failing at that same place (5 for `stop`: neither a string nor a list) each say what they take.
    messages = list(dict.fromkeys(str(e.get("msg")) for e in errors if _field_path(e) == path))
    param = ".".join(path) or "body"
    return ApiError(400, f"{param}: {'; or '.join(messages)}", param=param)


# async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop on every request.
async def caller(request: Request) -> Caller:
    return request.app.state.keys.authenticate(request.headers.get("authorization"))


AnyKey = Annotated[Caller, Depends(caller)]


async def operator(request: Request, who: AnyKey) -> Caller:
    return request.app.state.keys.require_operator(who)


Operator = Annotated[Caller, Depends(operator)]


def create_app(settings: Settings) -> FastAPI:
    tracer = tracing.tracer("alignloop-gateway", settings.otlp_traces_endpoint)
    interceptors = propagate_trace() if tracer is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.keys = KeyRing.from_file(settings.credentials_path)
        await asyncio.to_thread(ensure_topics, settings.kafka_bootstrap)
        app.state.completion_log = await asyncio.to_thread(
            CompletionLog.connect, settings.kafka_bootstrap, max_queue=settings.completion_queue_size
        )
        # Health-checked: a replica that is stopping or whose engine died gets no more calls.
        affinity = settings.policy_routing == "conversation"
        channel = retrying_channel(settings.policy_target, health_checked=True, affinity=affinity,
                                   interceptors=interceptors)
        app.state.policy = pb_grpc.PolicyServiceStub(channel)
        # No retries to the canary: the champion answers at once what the challenger cannot.
        canary_channel = balanced_channel(settings.policy_canary_target, health_checked=True, affinity=affinity,
                                          interceptors=interceptors)
        app.state.router = PolicyRouter(app.state.policy, pb_grpc.PolicyServiceStub(canary_channel),
                                        poll_s=settings.canary_poll_s)
        canary_poll = asyncio.create_task(app.state.router.follow(), name="canary-poll")
        reward_channel = retrying_channel(settings.reward_target, health_checked=True, interceptors=interceptors)
        app.state.chat = ChatService(app.state.router, app.state.completion_log, settings.grpc_timeout_s,
                                     reward_grpc.RewardServiceStub(reward_channel), affinity=affinity,
                                     cache_scope=settings.prefix_cache_scope)
        feedback_channel = retrying_channel(settings.feedback_target, health_checked=True,
                                            interceptors=interceptors)
        app.state.feedback_stub = feedback_grpc.FeedbackServiceStub(feedback_channel)
        app.state.feedback = FeedbackApi(app.state.feedback_stub, settings)
        # Not health-checked: the runner's thread-pool server would give each watching gateway a thread.
        pipeline_channel = retrying_channel(settings.pipeline_target, interceptors=interceptors)
        pipeline_stub = pipeline_grpc.PipelineServiceStub(pipeline_channel)
        app.state.pipeline = PipelineApi(pipeline_stub)
        app.state.models = ModelsApi(pipeline_stub, app.state.feedback_stub, app.state.router,
                                     settings.policy_model_name)
        yield
        canary_poll.cancel()
        await asyncio.gather(canary_poll, return_exceptions=True)
        await canary_channel.close()
        await channel.close()
        await feedback_channel.close()
        await pipeline_channel.close()
        await reward_channel.close()
        await asyncio.to_thread(app.state.completion_log.close)
        await app.state.rate_limits.close()

    app = FastAPI(title="alignloop gateway", version="0.1.0", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the caller's fault: answer in OpenAI's format, and leave one log line that the caller's
        # request id finds. Starlette runs this outside every middleware, so the id header is added here.
        rid = request_id(request)
        log.error("request %s: %s %s failed", rid, request.method, request.url.path, exc_info=exc)
        err = ApiError(500, f"internal error; the gateway's log has it under request id {rid}", "api_error")
        return JSONResponse(err.body(), status_code=500, headers={"x-request-id": rid})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = _validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status_code)

    # The last added runs first: the metrics count what RequestIds refuses too.
    admission = Admission(settings.max_chats_in_flight, settings.max_chats_in_flight_per_key)
    app.state.admission = admission
    app.state.rate_limits = RateLimiter(
        RedisBuckets(settings.rate_limit_redis_url) if settings.rate_limit_redis_url else LocalBuckets(),
        Limits(settings.rate_limit_requests_per_minute, settings.rate_limit_tokens_per_minute))
    app.add_middleware(ReleaseAdmitted, admission=admission)
    if tracer is not None:  # inside RequestIds: the span gets the request's id
        app.add_middleware(TracingMiddleware, tracer=tracer)
    app.add_middleware(RequestIds)
    app.add_middleware(metrics.RequestMetrics)

    async def policy_info(request: Request) -> pb.GetInfoResponse:
        try:
            return await request.app.state.policy.GetInfo(pb.GetInfoRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response, who: AnyKey):
        if body.model != settings.policy_model_name:
            raise ApiError(404, f"The model '{body.model}' does not exist; this gateway serves "
                                f"'{settings.policy_model_name}'.", param="model", code="model_not_found")
        if body.n > settings.max_n:
            raise ApiError(400, f"n must be at most {settings.max_n}", param="n")
        if (refused := body.unsupported()) is not None:
            raise ApiError(400, refused[1], param=refused[0], code="unsupported_parameter")
        if body.structured_outputs is not None and body.response_format is not None \
                and body.response_format.type != "text":
            raise ApiError(400, "Give either structured_outputs or a JSON response_format, not both",
                           param="structured_outputs")
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if body.best_of is not None:
            if body.stream:
                raise ApiError(400, "best_of cannot be used with stream: the answers are ranked once all are "
                                    "complete", param="best_of")
            if body.best_of < body.n:
                raise ApiError(400, f"best_of must be at least n ({body.n})", param="best_of")
            if body.best_of > settings.max_n:
                raise ApiError(400, f"best_of must be at most {settings.max_n}", param="best_of")
        priority = who.priority if body.priority is None else body.priority
        if priority < who.priority:
            raise ApiError(400, f"priority must be at least {who.priority}, this key's own: a request may wait "
                                "behind its tenant's others (a higher number), not go ahead of them",
                           param="priority")
        request.app.state.admission.enter(request.scope, who.key_hash)  # released by ReleaseAdmitted
        admitted = await request.app.state.rate_limits.admit(who.key_hash, who.limits, who.name)
        spend = admitted.spend if admitted else None
        limit_headers = admitted.headers if admitted else {}
        chat: ChatService = request.app.state.chat
        if body.stream:
            events = await chat.stream(body, who.key_hash, request_id(request), spend, priority)
            # Starlette's own streaming response, as vLLM's server uses: one plain send per token. sse-starlette
            # wraps every send in a timeout scope (benchmarks/sse_events.py: about 10× the cost of a send here),
            # and its keep-alive pings are for idle streams, which a token stream is not.
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              **limit_headers})
        response.headers.update(limit_headers)
        return await _cancel_on_disconnect(request, chat.complete(body, who.key_hash, request_id(request), spend,
                                                              priority))

    async def model_card(request: Request) -> ModelCard:
        info = await policy_info(request)
        return ModelCard(id=settings.policy_model_name, created=int(app.state.started_at),
                         version=info.model.version, max_model_len=info.max_model_len)

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request, _: AnyKey) -> ModelList:
        return ModelList(data=[await model_card(request)])

    @app.get("/v1/models/{model}", response_model=ModelCard)
    async def model(model: str, request: Request, _: AnyKey) -> ModelCard:
        if model != settings.policy_model_name:
            raise ApiError(404, f"The model '{model}' does not exist; this gateway serves "
                                f"'{settings.policy_model_name}'.", param="model", code="model_not_found")
        return await model_card(request)

    @app.post("/v1/feedback", response_model=FeedbackResult)
    async def feedback(request: Request, who: AnyKey) -> JSONResponse:
        api: FeedbackApi = request.app.state.feedback
        item = api.parse_single(await _read_capped(request, settings.feedback_max_body_bytes))
        results, replayed = await api.submit([item], who.key_hash, request.headers.get(IDEMPOTENCY_HEADER),
                                             batch=False, request_id=request_id(request))
        return _idempotent_response(results[0].model_dump(), replayed)

    @app.post("/v1/feedback/batch", response_model=FeedbackBatchResult)
    async def feedback_batch(request: Request, who: AnyKey) -> JSONResponse:
        api: FeedbackApi = request.app.state.feedback
        items = api.parse_batch(await _read_capped(request, settings.feedback_max_body_bytes))
        results, replayed = await api.submit(items, who.key_hash, request.headers.get(IDEMPOTENCY_HEADER),
                                             batch=True, request_id=request_id(request))
        return _idempotent_response(FeedbackBatchResult(data=results).model_dump(), replayed)

    @app.get("/v1/admin/feedback/stats", response_model=FeedbackStats)
    async def feedback_stats(request: Request, _: Operator, days: int = 30) -> FeedbackStats:
        if not 0 <= days <= 3660:
            raise ApiError(400, "days: from 0 (all) to 3660", param="days")
        return await request.app.state.feedback.stats(days)

    @app.get("/v1/admin/usage", response_model=UsageReport)
    async def usage(request: Request, _: Operator, days: int = 30) -> UsageReport:
        if not 0 <= days <= 3660:
            raise ApiError(400, "days: from 0 (all) to 3660", param="days")
        return await usage_report(request.app.state.feedback_stub, days, request.app.state.keys.names())

    @app.post("/v1/admin/pipelines/runs", response_model=PipelineRun, status_code=202)
    async def start_pipeline_run(request: Request, response: Response, who: Operator,
                                 body: StartRunRequest | None = None) -> PipelineRun:
        api: PipelineApi = request.app.state.pipeline
        run = await api.start(body or StartRunRequest(), who.key_hash)
        response.headers["Location"] = f"/v1/admin/pipelines/runs/{run.id}"
        return run

    @app.get("/v1/admin/pipelines/runs", response_model=PipelineRunList)
    async def list_pipeline_runs(request: Request, _: Operator,
                                 limit: int = LIST_LIMIT_DEFAULT) -> PipelineRunList:
        if not 1 <= limit <= LIST_LIMIT_MAX:
            raise ApiError(400, f"limit: from 1 to {LIST_LIMIT_MAX}", param="limit")
        return await request.app.state.pipeline.list(limit)

    @app.get("/v1/admin/pipelines/runs/{run_id}", response_model=PipelineRun)
    async def get_pipeline_run(run_id: str, request: Request, _: Operator) -> PipelineRun:
        return await request.app.state.pipeline.get(run_id)

    @app.post("/v1/admin/pipelines/runs/{run_id}/cancel", response_model=PipelineRun)
    async def cancel_pipeline_run(run_id: str, request: Request, who: Operator) -> PipelineRun:
        return await request.app.state.pipeline.cancel(run_id, who.key_hash)

    @app.get("/v1/admin/models/versions", response_model=ModelVersionList)
    async def model_versions(request: Request, _: Operator, days: int = 30, limit: int = 50) -> ModelVersionList:
        if not 0 <= days <= 3660:
            raise ApiError(400, "days: from 0 (all) to 3660", param="days")
        if not 1 <= limit <= 500:
            raise ApiError(400, "limit: from 1 to 500", param="limit")
        return await request.app.state.models.versions(days, limit)

    @app.put("/v1/admin/models/canary", response_model=ModelAliases)
    async def set_canary(body: SetCanaryRequest, request: Request, who: Operator) -> ModelAliases:
        return await request.app.state.models.set_canary(body, who.key_hash)

    @app.delete("/v1/admin/models/canary", response_model=ModelAliases)
    async def clear_canary(request: Request, who: Operator) -> ModelAliases:
        return await request.app.state.models.clear_canary(who.key_hash)

    @app.post("/v1/admin/models/promote", response_model=ModelAliases)
    async def promote_model(body: PromoteRequest, request: Request, who: Operator) -> ModelAliases:
        return await request.app.state.models.promote(body, who.key_hash)

    @app.post("/v1/admin/models/rollback", response_model=ModelAliases)
    async def rollback_model(request: Request, who: Operator, body: RollbackRequest | None = None) -> ModelAliases:
        return await request.app.state.models.rollback((body or RollbackRequest()).model, who.key_hash)

    @app.get("/healthz")
    async def healthz() -> dict:
        # Liveness only, deliberately unauthenticated (probes), and it reveals nothing.
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        # Ready means: can answer chat, so the policy must be. Kafka and the feedback service are reported but
        # not required. Every gateway shares them, and taking all gateways out of service when they fail would
        # stop chat as well, while the completion records wait in the backlog and feedback gets a 503 anyway.
        checks = {"kafka": request.app.state.completion_log.healthy()}
        try:
            health = await request.app.state.feedback_stub.Health(feedback_pb.HealthRequest(), timeout=2)
            checks["feedback"] = health.ready
        except grpc.aio.AioRpcError:
            checks["feedback"] = False
        try:
            info = await request.app.state.policy.GetInfo(pb.GetInfoRequest(), timeout=2)
            checks["policy"] = info.ready
        except grpc.aio.AioRpcError:
            checks["policy"] = False
        ready = checks["policy"]
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics(_: Operator) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    web.register(app, settings, operator)
    app.state.started_at = time.time()
    return app


async def _read_capped(request: Request, limit: int) -> bytes:
    """The body, refusing (413) more than `limit` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"The request body is larger than {limit} bytes.", param="body", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"The request body is larger than {limit} bytes.", param="body",
                           code="body_too_large")
    return bytes(body)


def _idempotent_response(body: dict, replayed: bool) -> JSONResponse:
    # As Stripe does: a replay answers exactly what the first request got, and says that it is a replay.
    return JSONResponse(body, headers={"Idempotent-Replayed": "true"} if replayed else None)


async def _cancel_on_disconnect(request: Request, work):
    """Runs `work`, cancelling it if the HTTP client disconnects first (Starlette does not, for plain routes)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    return Response(status_code=499)
