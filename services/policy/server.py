"""The policy service: gRPC Generate / GenerateStream over a vLLM AsyncLLM serving `alignloop-policy@champion`."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import grpc

from alignloop.config import Settings
from alignloop.contracts import PARAM_METADATA_KEY
from alignloop.grpc_serving import start_server, stop_on_signals
from alignloop.registry import fetch_version, resolve_alias
from alignloop.v1 import policy_pb2 as pb
from alignloop.v1 import policy_pb2_grpc as pb_grpc
from services.policy.engine import InvalidRequest, build_engine, completion_message, prepare

log = logging.getLogger("alignloop.policy")

class PolicyServicer(pb_grpc.PolicyServiceServicer):
    def __init__(self, engine, tokenizer, model: pb.ModelRef, max_model_len: int) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model = model
        self.max_model_len = max_model_len
        self.aborted_requests = 0

    async def _prepare(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, *, stream: bool):
        try:
            return prepare(request, self.tokenizer, self.max_model_len, stream=stream)
        except InvalidRequest as exc:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, str(exc), trailing_metadata=((PARAM_METADATA_KEY, exc.param),)
            )

    async def _outputs(self, request: pb.GenerateRequest, prepared) -> AsyncIterator:
        """Engine outputs for one request; the engine request is aborted if the caller goes away."""
        request_id = request.request_id or uuid.uuid4().hex
        finished = False
        try:
            async for out in self.engine.generate(
                {"prompt_token_ids": prepared.prompt_token_ids}, prepared.sampling_params, request_id
            ):
                finished = out.finished
                yield out
        finally:
            # A cancelled RPC raises CancelledError inside the loop: tell the engine to stop working on it.
            if not finished:
                self.aborted_requests += 1
                # Shielded: a second cancellation (the RPC's, arriving while we unwind) must not cut it short.
                await asyncio.shield(self.engine.abort(request_id))

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        prepared = await self._prepare(request, context, stream=False)
        s = request.sampling
        final = None
        async for out in self._outputs(request, prepared):
            final = out
        return pb.GenerateResponse(
            completions=[
                completion_message(o, with_logprobs=s.logprobs, top_k=s.top_logprobs)
                for o in sorted(final.outputs, key=lambda o: o.index)
            ],
            prompt_tokens=len(prepared.prompt_token_ids),
            model=self.model,
        )

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateStreamResponse]:
        prepared = await self._prepare(request, context, stream=True)
        s = request.sampling
        outputs = self._outputs(request, prepared)
        # Hand the request to the engine before writing anything: under a burst, every millisecond a request
        # waits here can cost it a place in the engine's next batch.
        first = asyncio.ensure_future(anext(outputs))
        try:
            # The request is valid: say so at once (callers can answer their own clients before the first token).
            yield pb.GenerateStreamResponse(prompt_tokens=len(prepared.prompt_token_ids), model=self.model)
            out = await first
            while True:
                yield pb.GenerateStreamResponse(
                    deltas=[completion_message(o, with_logprobs=s.logprobs, top_k=s.top_logprobs) for o in out.outputs]
                )
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
        return pb.GetInfoResponse(
            model=self.model,
            max_model_len=self.max_model_len,
            active_requests=self.engine.get_num_unfinished_requests(),
            ready=not self.engine.errored,
            aborted_requests=self.aborted_requests,
        )


async def serve(settings: Settings) -> None:
    ref = resolve_alias(settings.tracking_uri, settings.policy_model_name, settings.policy_model_alias)
    log.info("serving %s version %s (alias %s)", ref.name, ref.version, settings.policy_model_alias)
    model_dir = fetch_version(settings.tracking_uri, ref, settings.models_dir)

    engine = build_engine(settings, model_dir, served_name=ref.name)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    max_model_len = engine.model_config.max_model_len

    model = pb.ModelRef(name=ref.name, version=ref.version)
    servicer = PolicyServicer(engine, tokenizer, model, max_model_len)
    address = f"{settings.host}:{settings.policy_port}"
    server = await start_server(address,
                                lambda srv: pb_grpc.add_PolicyServiceServicer_to_server(servicer, srv))
    log.info("policy service listening on %s", address)

    stop = stop_on_signals()
    await stop.wait()
    log.info("stopping: finishing in-flight requests (5 s grace)")
    await server.stop(grace=5)
    engine.shutdown()


def main() -> None:
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvloop, as vLLM's own server uses: cheaper wake-ups for the many small gRPC and engine events.
    uvloop.run(serve(Settings()))
