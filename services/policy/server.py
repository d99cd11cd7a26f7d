"""The policy service: gRPC Generate / GenerateStream over a vLLM AsyncLLM serving `alignloop-policy@champion`.

Promotions are followed live (`follow_alias`): every `policy_poll_s` the registry is asked where the alias
points; a new version of the same architecture is fetched, then new requests wait at a gate while vLLM
finishes the requests it has (pause_generation mode "wait"), reloads the weights in place from the version's
folder (with its tied output head spelled out: alignloop/inplace_reload.py) and drops its prefix cache; then
the gate opens. No request fails and no answer mixes two versions; each response names the version that
produced all of it. A version of another architecture cannot be loaded in place: it is logged and the service
keeps serving (a restart picks it up).

The canary service is this same service following `policy_canary_alias` with `policy_wait_for_alias`: it starts
with no engine (GetInfo: not ready; Generate: UNAVAILABLE), builds one when a challenger is first named, and
reports the challenger's traffic share from the registry so the gateway can split by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from prometheus_client import start_http_server

from alignloop import alias_follower, tracing
from alignloop.config import Settings
from alignloop.contracts import PARAM_METADATA_KEY
from alignloop.grpc_health import HealthService
from alignloop.grpc_serving import start_server, stop_on_signals
from alignloop.inplace_reload import architecture, reload_folder
from alignloop.registry import ModelNotRegistered, ModelVersionRef, canary_share, fetch_version, resolve_alias
from alignloop.v1 import policy_pb2 as pb
from alignloop.v1 import policy_pb2_grpc as pb_grpc
from services.policy import metrics
from services.policy.engine import (InvalidRequest, build_engine, completion_message, engine_input, prepare,
                                    vllm_checks)

log = logging.getLogger("alignloop.policy")



SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PolicyService"].full_name


def annotate_accepted(span, model: pb.ModelRef, prepared) -> None:
    """What a call's span should say once the request is accepted: the version serving it, the prompt's size."""
    if span is not None:
        span.set_attributes({"gen_ai.request.model": model.name, "alignloop.model.version": model.version,
                             "gen_ai.usage.input_tokens": len(prepared.prompt_token_ids)})


def annotate_finished(span, out) -> None:
    """A finished unary request's output size and why each choice ended (a stream's outputs are deltas; vLLM's
    own span has its totals)."""
    if span is not None:
        span.set_attributes({"gen_ai.usage.output_tokens": sum(len(o.token_ids) for o in out.outputs),
                             "gen_ai.response.finish_reasons": [str(o.finish_reason) for o in out.outputs]})


class PolicyServicer(pb_grpc.PolicyServiceServicer):
    def __init__(self, alias: str, engine=None, tokenizer=None, model: pb.ModelRef | None = None,
                 max_model_len: int = 0, *, ready_without_engine: bool = False, tracer=None) -> None:
        self.alias = alias
        self.tracer = tracer  # None: tracing is off (alignloop/tracing.py)
        # A canary has nothing to serve until a challenger is named: answering is ready for it.
        self.ready_without_engine = ready_without_engine
        self.engine = engine  # None until a version is loaded (a service waiting for its alias)
        self.tokenizer = tokenizer
        self.model = model or pb.ModelRef()
        self.max_model_len = max_model_len
        self.canary_percent = 0
        self.aborted_requests = 0
        self.swaps = 0
        # Closed while a new version is loaded: requests wait here instead of failing.
        self.open = asyncio.Event()
        self.open.set()

    def attach(self, engine, tokenizer, model: pb.ModelRef, max_model_len: int) -> None:
        """The version loaded at the start (after waiting for the alias, for a service told to)."""
        self.tokenizer, self.model, self.max_model_len = tokenizer, model, max_model_len
        self.engine = engine
        metrics.serving(model.name, self.alias, model.version)

    async def ready(self) -> bool:
        """grpc.health.v1 readiness: a version is loaded (or need not be) and its engine works."""
        if self.engine is None:
            return self.ready_without_engine
        return not self.engine.errored

    async def alive(self) -> bool:
        """grpc.health.v1 liveness: false once the engine died, which only a restart mends."""
        return self.engine is None or not self.engine.errored

    async def _admit(self, context: grpc.aio.ServicerContext) -> tuple[pb.ModelRef, object]:
        """Waits while a swap is under way; the version (and its tokenizer) this request is served by."""
        await self.open.wait()
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"no model version has the alias {self.alias!r} yet")
        return self.model, self.tokenizer

    async def _prepare(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, tokenizer, *,
                       stream: bool):
        try:
            return prepare(request, tokenizer, self.max_model_len, stream=stream, verify=vllm_checks(self.engine))
        except InvalidRequest as exc:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, str(exc), trailing_metadata=((PARAM_METADATA_KEY, exc.param),)
            )

    async def _outputs(self, request: pb.GenerateRequest, prepared, span) -> AsyncIterator:
        """Engine outputs for one request; the engine request is aborted if the caller goes away."""
        request_id = request.request_id or uuid.uuid4().hex
        finished = False
        # vLLM's own span of the request (queueing, prefill, decode) becomes a child of this call's.
        trace_headers = tracing.inject(span) if span is not None else None
        try:
            async for out in self.engine.generate(
                engine_input(self.engine, prepared.prompt_token_ids, request.cache_salt), prepared.sampling_params,
                request_id, trace_headers=trace_headers, priority=request.priority,
            ):
                finished = out.finished
                yield out
        finally:
            # A cancelled RPC raises CancelledError inside the loop: tell the engine to stop working on it.
            if not finished:
                self.aborted_requests += 1
                # Shielded: a second cancellation (the RPC's, arriving while we unwind) must not cut it short.
                await asyncio.shield(self.engine.abort(request_id))

    def _traced(self, method: str, request: pb.GenerateRequest, context):
        return tracing.grpc_server_span(self.tracer, SERVICE_NAME, method, context,
                                        {"alignloop.request_id": request.request_id})

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        with self._traced("Generate", request, context) as span, metrics.counted("Generate", context):
            return await self._generate(request, context, span)

    async def _generate(self, request: pb.GenerateRequest, context, span=None) -> pb.GenerateResponse:
        model, tokenizer = await self._admit(context)
        prepared = await self._prepare(request, context, tokenizer, stream=False)
        annotate_accepted(span, model, prepared)
        s = request.sampling
        final = None
        async for out in self._outputs(request, prepared, span):
            final = out
        annotate_finished(span, final)
        return pb.GenerateResponse(
            completions=[
                completion_message(o, with_logprobs=s.logprobs, top_k=s.top_logprobs)
                for o in sorted(final.outputs, key=lambda o: o.index)
            ],
            prompt_tokens=len(prepared.prompt_token_ids),
            model=model,
            cached_tokens=final.num_cached_tokens or 0,
        )

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateStreamResponse]:
        # aclosing: if this generator is closed at a yield (the caller went away), the inner one must be closed
        # too, now, since its cleanup aborts the engine request.
        with self._traced("GenerateStream", request, context) as span:
            async with contextlib.aclosing(self._generate_stream(request, context, span)) as messages:
                with metrics.counted("GenerateStream", context):
                    async for message in messages:
                        yield message

    async def _generate_stream(self, request: pb.GenerateRequest, context,
                               span=None) -> AsyncIterator[pb.GenerateStreamResponse]:
        model, tokenizer = await self._admit(context)
        prepared = await self._prepare(request, context, tokenizer, stream=True)
        annotate_accepted(span, model, prepared)
        s = request.sampling
        outputs = self._outputs(request, prepared, span)
        # Hand the request to the engine before writing anything: under a burst, every millisecond a request
        # waits here can cost it a place in the engine's next batch.
        first = asyncio.ensure_future(anext(outputs))
        try:
            # The request is valid: say so at once (callers can answer their own clients before the first token).
            yield pb.GenerateStreamResponse(prompt_tokens=len(prepared.prompt_token_ids), model=model)
            out = await first
            # vLLM knows the prefix-cache hits once the prompt is prefilled, which its first output follows.
            cached_tokens = out.num_cached_tokens or 0
            while True:
                yield pb.GenerateStreamResponse(
                    deltas=[completion_message(o, with_logprobs=s.logprobs, top_k=s.top_logprobs) for o in out.outputs],
                    cached_tokens=cached_tokens,
                )
                cached_tokens = 0
                if out.finished:
                    break
                out = await anext(outputs)
        finally:
            # Caller gone (or the write failed): stop the pending read, which aborts the engine request.
            if not first.done():
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
            await outputs.aclose()

    async def GetInfo(self, request: pb.GetInfoRequest, context) -> pb.GetInfoResponse:
        info = pb.GetInfoResponse(model=self.model, max_model_len=self.max_model_len, alias=self.alias,
                                  canary_percent=self.canary_percent, aborted_requests=self.aborted_requests,
                                  swaps=self.swaps)
        if self.engine is not None:
            info.active_requests = self.engine.get_num_unfinished_requests()
            info.ready = not self.engine.errored
        return info

    async def swap(self, version: str, folder: Path) -> float:
        """Loads `folder`'s weights in place (see the module docstring); returns the seconds requests waited."""
        from transformers import AutoTokenizer

        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(folder))
        weights = await asyncio.to_thread(reload_folder, folder)
        started = time.perf_counter()
        self.open.clear()
        try:
            await self.engine.pause_generation(mode="wait", clear_cache=True)
            try:
                await self.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(weights)})
                await self.engine.reset_prefix_cache()
            finally:
                await self.engine.resume_generation()
            self.tokenizer = tokenizer
            self.model = pb.ModelRef(name=self.model.name, version=version)
            self.swaps += 1
            metrics.SWAPS.inc()
            metrics.serving(self.model.name, self.alias, version)
        finally:
            self.open.set()
        paused = time.perf_counter() - started
        metrics.SWAP_PAUSE_SECONDS.observe(paused)
        return paused


async def follow_alias(settings: Settings, servicer: PolicyServicer, served_dir: Path, stop: asyncio.Event) -> None:
    """Loads the version `policy_model_name@alias` points to, whenever it moves."""
    shape = architecture(served_dir)

    async def load(ref) -> None:
        folder = await asyncio.to_thread(fetch_version, settings.tracking_uri, ref, settings.models_dir)
        if architecture(folder) != shape:
            raise ValueError(f"version {ref.version} has another architecture ({architecture(folder)}); "
                             "restart the policy service to serve it")
        waited = await servicer.swap(ref.version, folder)
        log.info("now serving %s version %s (requests waited %.2f s)", ref.name, ref.version, waited)

    await alias_follower.follow_alias(settings.tracking_uri, settings.policy_model_name,
                                      settings.policy_model_alias, settings.policy_poll_s,
                                      current=lambda: servicer.model.version, load=load, stop=stop, log=log)


async def wait_for_alias(settings: Settings, stop: asyncio.Event) -> ModelVersionRef | None:
    """Polls until `policy_model_name@policy_model_alias` names a version; None if stopped first."""
    name, alias = settings.policy_model_name, settings.policy_model_alias
    log.info("waiting for a version with the alias %s@%s", name, alias)
    while not stop.is_set():
        try:
            return await asyncio.to_thread(resolve_alias, settings.tracking_uri, name, alias)
        except ModelNotRegistered:
            pass
        except Exception as exc:  # registry down: keep waiting
            log.warning("could not resolve %s@%s: %s", name, alias, exc)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.policy_poll_s):
                await stop.wait()
    return None


async def follow_canary_share(settings: Settings, servicer: PolicyServicer, stop: asyncio.Event) -> None:
    """Keeps `servicer.canary_percent` at the registry's share for the version this service serves (0 while
    the alias names another version, still loading, or none)."""
    while not stop.is_set():
        try:
            share = await asyncio.to_thread(canary_share, settings.tracking_uri, settings.policy_model_name,
                                            settings.policy_model_alias)
            servicer.canary_percent = share.percent if share.version == servicer.model.version else 0
        except Exception as exc:  # registry down: keep the last known share
            log.warning("could not read the canary share: %s", exc)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.policy_poll_s):
                await stop.wait()


async def log_engine_stats(servicer: PolicyServicer, stop: asyncio.Event) -> None:
    """vLLM's throughput and cache line in the log, at vLLM's interval, as its own server writes it.

    It reads the engine from `servicer` each time and never binds it to a local: a cancelled task's frame
    outlives it (in the task's exception), and the engine must not (see `serve`)."""
    from vllm import envs

    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(envs.VLLM_LOG_STATS_INTERVAL):
                await stop.wait()
        if stop.is_set():
            return
        if servicer.engine is None:
            return
        try:
            await servicer.engine.do_log_stats()
        except Exception:  # a dead engine shows in GetInfo and its own log; this task just must not die silently
            log.exception("could not log the engine's statistics; no more will be logged")
            return


def load_engine(settings: Settings, ref: ModelVersionRef):
    """Fetches `ref` and builds its engine; (engine, tokenizer, folder)."""
    from transformers import AutoTokenizer

    model_dir = fetch_version(settings.tracking_uri, ref, settings.models_dir)
    # No local name for the engine: vLLM keeps a frame from its construction alive, and with it this one's.
    return build_engine(settings, model_dir, served_name=ref.name), AutoTokenizer.from_pretrained(str(model_dir)), \
        model_dir


async def serve(settings: Settings) -> None:
    alias = settings.policy_model_alias
    stop = stop_on_signals()
    # Without wait-for-alias, a missing alias fails the start, before the port is taken.
    ref = None if settings.policy_wait_for_alias else resolve_alias(settings.tracking_uri,
                                                                   settings.policy_model_name, alias)
    # The canary's spans say so; vLLM names its own spans' service from OTEL_SERVICE_NAME.
    service = "alignloop-policy" if alias != settings.policy_canary_alias else "alignloop-policy-canary"
    if settings.otlp_traces_endpoint:
        os.environ.setdefault("OTEL_SERVICE_NAME", service)
    servicer = PolicyServicer(alias, ready_without_engine=settings.policy_wait_for_alias,
                              tracer=tracing.tracer(service, settings.otlp_traces_endpoint))
    health = HealthService(SERVICE_NAME, servicer.ready, servicer.alive)
    address = f"{settings.host}:{settings.policy_port}"
    server = await start_server(address,
                                lambda srv: pb_grpc.add_PolicyServiceServicer_to_server(servicer, srv),
                                health=health, max_connection_age_s=settings.grpc_max_connection_age_s)
    start_http_server(settings.policy_metrics_port, addr=settings.host)
    log.info("policy service listening on %s; metrics on :%d", address, settings.policy_metrics_port)
    tasks: list[asyncio.Task] = []
    try:
        if ref is None:
            ref = await wait_for_alias(settings, stop)
        if ref is not None:
            log.info("serving %s version %s (alias %s)", ref.name, ref.version, alias)
            # Built on the loop: AsyncLLM binds its output handler to the running loop.
            engine, tokenizer, model_dir = load_engine(settings, ref)
            servicer.attach(engine, tokenizer, pb.ModelRef(name=ref.name, version=ref.version),
                            engine.model_config.max_model_len)
            tasks.append(asyncio.create_task(follow_alias(settings, servicer, model_dir, stop), name="follow-alias"))
            if alias == settings.policy_canary_alias:
                tasks.append(asyncio.create_task(follow_canary_share(settings, servicer, stop), name="canary-share"))
            if settings.engine_stats:
                tasks.append(asyncio.create_task(log_engine_stats(servicer, stop), name="engine-stats"))
            await stop.wait()
    finally:
        health.stopping()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("stopping: finishing in-flight requests (%g s grace)", settings.drain_s)
        await server.stop(grace=settings.drain_s)
        # Shut down here, with every module still loaded, and drop the last references: vLLM's AsyncLLM
        # shuts down again from __del__, which at interpreter exit finds its module globals gone and raises.
        engine, servicer.engine = servicer.engine, None
        if engine is not None:
            engine.shutdown()
        del engine


def main() -> None:
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvloop, as vLLM's own server uses: cheaper wake-ups for the many small gRPC and engine events.
    uvloop.run(serve(Settings()))
    gc.collect()  # the engine's own finaliser runs now, while vLLM's modules are still there for it
