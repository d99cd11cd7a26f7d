"""The reward service: gRPC Score over `alignloop-reward@champion`, batched across calls, swapped live.

A background task asks the registry every `reward_poll_s` where the alias points. When it points at another
version, that version is fetched, loaded and warmed up in a thread while the current one keeps serving; then
one assignment on the event loop makes it the version new calls get. Calls already queued keep the version
they were given (the batcher never mixes versions in a batch, nor splits a call across versions) and the old
model is freed when the last of them is answered. If the new version cannot be loaded, the old one keeps
serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import grpc

from alignloop import alias_follower, tracing
from alignloop.config import Settings
from alignloop.contracts import PARAM_METADATA_KEY
from alignloop.grpc_health import HealthService
from alignloop.grpc_serving import start_server, stop_on_signals
from alignloop.registry import ModelNotRegistered, resolve_alias
from alignloop.reward_model import render
from alignloop.v1 import policy_pb2
from alignloop.v1 import reward_pb2 as pb
from alignloop.v1 import reward_pb2_grpc as pb_grpc
from services.reward import metrics
from services.reward.batcher import Batcher, BatcherStopped
from services.reward.model import ServedModel, load_version
from services.reward.validation import check_request

log = logging.getLogger("alignloop.reward")


class ModelSlot:
    """The version new calls are scored by. Replaced by one assignment on the event loop, so a call sees
    either the old or the new version, never a mix."""

    def __init__(self, served: ServedModel, alias: str) -> None:
        self.alias = alias
        self.swaps = 0
        self.current = served
        self._publish()

    def swap(self, served: ServedModel) -> None:
        old = self.current
        self.current = served
        self.swaps += 1
        metrics.SWAPS.inc()
        self._publish()
        log.info("now serving %s version %s (was version %s)", served.name, served.version, old.version)

    def _publish(self) -> None:
        s = self.current
        if s.version.isdigit():
            metrics.SERVED_VERSION.labels(s.name, self.alias).set(int(s.version))


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RewardService"].full_name


class RewardServicer(pb_grpc.RewardServiceServicer):
    def __init__(self, slot: ModelSlot, batcher: Batcher, max_items: int, tracer=None) -> None:
        self.slot = slot
        self.batcher = batcher
        self.max_items = max_items
        self.tracer = tracer  # None: tracing is off (alignloop/tracing.py)

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        with tracing.grpc_server_span(self.tracer, SERVICE_NAME, "Score", context,
                                      {"alignloop.items": len(request.items)}):
            return await self._score(request, context)

    async def _score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        started = time.perf_counter()
        problem = check_request(request, self.max_items)
        if problem is not None:
            metrics.REQUESTS.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{problem.param}: {problem.message}",
                                trailing_metadata=((PARAM_METADATA_KEY, problem.param),))
        texts = [render([{"role": m.role, "content": m.content} for m in item.messages], item.response)
                 for item in request.items]
        served = self.slot.current  # the one version this whole call is scored by
        try:
            rewards = await self.batcher.submit(served, texts)
        except BatcherStopped as exc:
            metrics.REQUESTS.labels("error").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except Exception as exc:
            log.exception("scoring %d items with version %s failed", len(texts), served.version)
            metrics.REQUESTS.labels("error").inc()
            await context.abort(grpc.StatusCode.INTERNAL, f"scoring failed: {type(exc).__name__}: {exc}")
        metrics.REQUESTS.labels("ok").inc()
        metrics.ITEMS.inc(len(texts))
        metrics.REQUEST_SECONDS.observe(time.perf_counter() - started)
        return pb.ScoreResponse(rewards=rewards,
                                model=policy_pb2.ModelRef(name=served.name, version=served.version))

    async def ready(self) -> bool:
        """grpc.health.v1 readiness: the batcher is scoring."""
        return self.batcher.running

    async def GetInfo(self, request: pb.GetRewardInfoRequest, context) -> pb.GetRewardInfoResponse:
        s = self.slot.current
        return pb.GetRewardInfoResponse(
            model=policy_pb2.ModelRef(name=s.name, version=s.version),
            ready=self.batcher.running,
            untrained=s.untrained,
            device=s.device,
            max_batch=self.batcher.max_batch,
            max_items=self.max_items,
            queued_items=self.batcher.queued_items,
            swaps=self.slot.swaps,
            alias=self.slot.alias,
        )


async def follow_alias(settings: Settings, slot: ModelSlot, stop: asyncio.Event) -> None:
    """Swaps in the version `reward_model_name@alias` points to, whenever it changes."""

    async def load(ref) -> None:
        served = await asyncio.to_thread(load_version, settings, ref)
        # If the alias moved again while this one loaded, the next poll catches up.
        slot.swap(served)

    await alias_follower.follow_alias(settings.tracking_uri, settings.reward_model_name, slot.alias,
                                      settings.reward_poll_s, current=lambda: slot.current.version, load=load,
                                      stop=stop, log=log, on_failure=metrics.SWAP_FAILURES.inc)


async def serve(settings: Settings) -> None:
    from prometheus_client import start_http_server

    if settings.reward_threads > 0:
        import torch

        torch.set_num_threads(settings.reward_threads)
    name, alias = settings.reward_model_name, settings.reward_model_alias
    try:
        ref = await asyncio.to_thread(resolve_alias, settings.tracking_uri, name, alias)
    except ModelNotRegistered as exc:
        raise SystemExit(f"{exc}: `alignloop up` registers a placeholder reward model if none is") from exc
    log.info("serving %s version %s (alias %s)", ref.name, ref.version, alias)
    slot = ModelSlot(await asyncio.to_thread(load_version, settings, ref), alias)

    def on_batch(_model: ServedModel, size: int, seconds: float) -> None:
        metrics.BATCH_SIZE.observe(size)
        metrics.FORWARD_SECONDS.observe(seconds)

    batcher: Batcher = Batcher(ServedModel.score, max_batch=settings.reward_max_batch,
                               max_wait_s=settings.reward_max_wait_ms / 1000.0, on_batch=on_batch)
    batcher.start()
    metrics.QUEUED_ITEMS.set_function(lambda: batcher.queued_items)
    start_http_server(settings.reward_metrics_port, addr=settings.host)

    servicer = RewardServicer(slot, batcher, settings.reward_max_items,
                              tracer=tracing.tracer("alignloop-reward", settings.otlp_traces_endpoint))
    address = f"{settings.host}:{settings.reward_port}"
    health = HealthService(SERVICE_NAME, servicer.ready)
    server = await start_server(address,
                                lambda srv: pb_grpc.add_RewardServiceServicer_to_server(servicer, srv),
                                health=health, max_connection_age_s=settings.grpc_max_connection_age_s)
    log.info("reward service listening on %s (max_batch %d, max_wait %.1f ms); metrics on :%d", address,
             settings.reward_max_batch, settings.reward_max_wait_ms, settings.reward_metrics_port)

    stop = stop_on_signals()
    poller = asyncio.create_task(follow_alias(settings, slot, stop), name="follow-alias")
    await stop.wait()
    health.stopping()
    log.info("stopping: finishing in-flight calls (%g s grace)", settings.drain_s)
    poller.cancel()
    await server.stop(grace=settings.drain_s)
    await batcher.stop()


def main() -> None:
    import uvloop

    # Progress bars (artifact downloads, weight loading) are noise in a service log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(serve(Settings()))
