"""The gateway's gRPC channels on real gRPC servers: a call a server refuses with UNAVAILABLE or CANCELLED (as a
stopping one does) is sent again, but only if repeating it is safe; a call the client cancels is not."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import grpc
import pytest

from alignloop.grpc_channels import retrying_channel, service_config
from alignloop.grpc_serving import start_server
from alignloop.v1 import pipeline_pb2 as ppb
from alignloop.v1 import pipeline_pb2_grpc as ppb_grpc
from alignloop.v1 import policy_pb2 as pb
from alignloop.v1 import policy_pb2_grpc as pb_grpc
from tests.conftest import free_port

pytestmark = pytest.mark.integration

ANSWER = pb.Completion(index=0, text="hi", token_ids=[1], finish_reason="stop")


class Flaky(pb_grpc.PolicyServiceServicer, ppb_grpc.PipelineServiceServicer):
    """Refuses the first `refusals` calls of each method with `code`, then answers (Generate after `pause_s`)."""

    def __init__(self, refusals: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 pause_s: float = 0.0) -> None:
        self.refusals = refusals
        self.code = code
        self.pause_s = pause_s
        self.calls: dict[str, int] = {}

    async def _maybe_refuse(self, method: str, context) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] <= self.refusals:
            await context.abort(self.code, "stopping")

    async def Generate(self, request, context):
        await self._maybe_refuse("Generate", context)
        await asyncio.sleep(self.pause_s)
        return pb.GenerateResponse(completions=[ANSWER])

    async def GenerateStream(self, request, context):
        await self._maybe_refuse("GenerateStream", context)
        yield pb.GenerateStreamResponse(prompt_tokens=1)
        yield pb.GenerateStreamResponse(deltas=[ANSWER])

    async def StartRun(self, request, context):
        await self._maybe_refuse("StartRun", context)
        return ppb.PipelineRun(run_id="run-1")

    async def ListRuns(self, request, context):
        await self._maybe_refuse("ListRuns", context)
        return ppb.ListRunsResponse()


@contextlib.asynccontextmanager
async def flaky_server(refusals: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                       pause_s: float = 0.0) -> AsyncIterator[tuple[Flaky, str]]:
    """A real gRPC server on a free port with a Flaky servicer behind both services; (servicer, address)."""
    servicer = Flaky(refusals, code, pause_s)
    address = f"127.0.0.1:{free_port()}"

    def add(server):
        pb_grpc.add_PolicyServiceServicer_to_server(servicer, server)
        ppb_grpc.add_PipelineServiceServicer_to_server(servicer, server)

    server = await start_server(address, add)
    try:
        yield servicer, address
    finally:
        await server.stop(None)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED],
                         ids=["unavailable", "cancelled"])
def test_idempotent_calls_are_retried_through_a_few_refusals(code):
    """UNAVAILABLE: a stopping server refusing a new call. CANCELLED: what gRPC core answers a call that
    reached a stopping server before any handler took it (grpc/grpc#41785)."""
    async def scenario():
        async with flaky_server(refusals=2, code=code) as (servicer, address):
            # A channel each: the retry throttle of one channel counts every failure it saw.
            async with retrying_channel(address) as channel:
                policy = pb_grpc.PolicyServiceStub(channel)
                assert (await policy.Generate(pb.GenerateRequest(), timeout=10)).completions[0].text == "hi"
            async with retrying_channel(address) as channel:
                policy = pb_grpc.PolicyServiceStub(channel)
                stream = [m async for m in policy.GenerateStream(pb.GenerateRequest(), timeout=10)]
                assert stream[-1].deltas[0].text == "hi"
            async with retrying_channel(address) as channel:
                await ppb_grpc.PipelineServiceStub(channel).ListRuns(ppb.ListRunsRequest(), timeout=10)
            assert servicer.calls == {"Generate": 3, "GenerateStream": 3, "ListRuns": 3}

    asyncio.run(scenario())


def test_a_call_that_is_not_safe_to_repeat_is_not_retried():
    async def scenario():
        async with flaky_server(refusals=1) as (servicer, address):
            async with retrying_channel(address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await ppb_grpc.PipelineServiceStub(channel).StartRun(ppb.StartRunRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert servicer.calls == {"StartRun": 1}

    asyncio.run(scenario())


def test_a_call_the_client_cancels_is_not_sent_again():
    """Retrying CANCELLED covers only a status the server sent: the gateway cancelling a call (its client went
    away) ends it."""
    async def scenario():
        async with flaky_server(refusals=0, pause_s=5.0) as (servicer, address):
            async with retrying_channel(address) as channel:
                call = pb_grpc.PolicyServiceStub(channel).Generate(pb.GenerateRequest(), timeout=10)
                for _ in range(200):  # until the handler has it
                    if servicer.calls:
                        break
                    await asyncio.sleep(0.01)
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
                await asyncio.sleep(0.5)  # a retry would have reached the server by now
            assert servicer.calls == {"Generate": 1}

    asyncio.run(scenario())


def test_a_server_that_stays_down_is_reported_and_then_not_retried():
    async def scenario():
        async with flaky_server(refusals=100) as (servicer, address):
            async with retrying_channel(address) as channel:
                policy = pb_grpc.PolicyServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await policy.Generate(pb.GenerateRequest(), timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert servicer.calls == {"Generate": 5}  # maxAttempts, then the error
                # Five failures emptied half the throttle's bucket: the next call is not retried at all.
                with pytest.raises(grpc.aio.AioRpcError):
                    await policy.Generate(pb.GenerateRequest(), timeout=10)
                assert servicer.calls == {"Generate": 6}

    asyncio.run(scenario())


def test_without_the_retry_policy_the_first_refusal_is_the_answer():
    async def scenario():
        async with flaky_server(refusals=1) as (servicer, address):
            async with grpc.aio.insecure_channel(address) as channel:
                with pytest.raises(grpc.aio.AioRpcError):
                    await pb_grpc.PolicyServiceStub(channel).Generate(pb.GenerateRequest(), timeout=10)
            assert servicer.calls == {"Generate": 1}

    asyncio.run(scenario())


def test_every_method_named_in_the_service_config_exists():
    from alignloop.v1 import feedback_pb2, reward_pb2

    # Importing a module registers its services in the default pool; the pool of any of them finds them all.
    pool = feedback_pb2.DESCRIPTOR.pool
    assert reward_pb2.DESCRIPTOR.pool is pool
    [method_config] = json.loads(service_config())["methodConfig"]
    for name in method_config["name"]:
        service = pool.FindServiceByName(name["service"])
        if "method" in name:
            assert service.FindMethodByName(name["method"]) is not None, name
