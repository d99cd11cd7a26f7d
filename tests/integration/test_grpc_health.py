"""grpc.health.v1 as alignloop's services serve it (alignloop/grpc_health.py), on real gRPC servers: the names
published, readiness against liveness, the drain, Watch, and the shared check behind many watchers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent import futures

import grpc
import pytest

from alignloop.grpc_health import (
    LIVENESS,
    NOT_SERVING,
    SERVICE_UNKNOWN,
    SERVING,
    HealthService,
    ThreadedHealthService,
    add_health,
    check,
)
from alignloop.grpc_serving import start_server
from alignloop.v1 import health_pb2 as pb
from alignloop.v1 import health_pb2_grpc as pb_grpc
from tests.conftest import free_port

pytestmark = pytest.mark.integration

NAME = "alignloop.v1.PolicyService"


class Flags:
    """What the service's own checks read: flipped by the tests."""

    def __init__(self) -> None:
        self.ready = True
        self.alive = True
        self.broken = False
        self.ready_calls = 0

    async def is_ready(self) -> bool:
        self.ready_calls += 1
        if self.broken:
            raise RuntimeError("the check itself failed")
        return self.ready

    async def is_alive(self) -> bool:
        return self.alive


@contextlib.asynccontextmanager
async def health_server(watch_interval_s: float = 0.05):
    flags = Flags()
    health = HealthService(NAME, flags.is_ready, flags.is_alive, watch_interval_s=watch_interval_s)
    address = f"127.0.0.1:{free_port()}"
    server = await start_server(address, lambda _srv: None, health=health)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            yield flags, health, pb_grpc.HealthStub(channel)
    finally:
        await server.stop(None)


async def status(stub, service: str) -> int:
    return (await stub.Check(pb.HealthCheckRequest(service=service), timeout=5)).status


def test_check_reports_readiness_and_liveness_apart():
    async def scenario():
        async with health_server() as (flags, health, stub):
            assert [await status(stub, s) for s in ("", NAME, LIVENESS)] == [SERVING] * 3
            flags.ready = False  # e.g. Kafka down: not ready, but a restart would not help
            assert [await status(stub, s) for s in ("", NAME, LIVENESS)] == [NOT_SERVING, NOT_SERVING, SERVING]
            flags.ready, flags.alive = True, False  # e.g. the engine died
            assert await status(stub, LIVENESS) == NOT_SERVING
            flags.alive, flags.broken = True, True
            assert await status(stub, "") == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await status(stub, "alignloop.v1.NoSuchService")
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())


def test_a_stopping_service_is_not_ready_but_still_alive():
    async def scenario():
        async with health_server() as (_flags, health, stub):
            health.stopping()
            assert [await status(stub, s) for s in ("", NAME, LIVENESS)] == [NOT_SERVING, NOT_SERVING, SERVING]

    asyncio.run(scenario())


def test_watch_sends_the_status_then_each_change():
    async def scenario():
        async with health_server(watch_interval_s=0.05) as (flags, health, stub):
            call = stub.Watch(pb.HealthCheckRequest(service=""))
            assert (await call.read()).status == SERVING
            flags.ready = False
            assert (await asyncio.wait_for(call.read(), 10)).status == NOT_SERVING
            flags.ready = True
            assert (await asyncio.wait_for(call.read(), 10)).status == SERVING
            call.cancel()

            unknown = stub.Watch(pb.HealthCheckRequest(service="nope"))
            assert (await unknown.read()).status == SERVICE_UNKNOWN
            unknown.cancel()

    asyncio.run(scenario())


def test_watchers_hear_of_a_stop_without_waiting_for_the_next_poll():
    async def scenario():
        async with health_server(watch_interval_s=3600) as (_flags, health, stub):
            call = stub.Watch(pb.HealthCheckRequest(service=NAME))
            assert (await call.read()).status == SERVING
            health.stopping()
            assert (await asyncio.wait_for(call.read(), 10)).status == NOT_SERVING
            call.cancel()

    asyncio.run(scenario())


def test_many_watchers_share_one_check_per_interval():
    """A check may ask Kafka or a database: 20 watching clients must not make it 20 times as often."""
    async def scenario():
        async with health_server(watch_interval_s=0.2) as (flags, health, stub):
            calls = [stub.Watch(pb.HealthCheckRequest(service="")) for _ in range(20)]
            for call in calls:
                assert (await call.read()).status == SERVING
            assert health.watchers == 20
            before = flags.ready_calls
            await asyncio.sleep(2.0)  # about 10 intervals
            made = flags.ready_calls - before
            for call in calls:
                call.cancel()
            # One per interval, give or take the ones that straddle an interval's end; 20 watchers polling on
            # their own would make about 200.
            assert 3 <= made <= 40, made

    asyncio.run(scenario())


@contextlib.contextmanager
def thread_pool_server(health: ThreadedHealthService):
    """A started thread-pool gRPC server serving `health`; its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_health(server, health)
    target = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(target)
    server.start()
    try:
        yield target
    finally:
        server.stop(None)


def test_a_thread_pool_server_answers_too():
    """The pipeline runner's server runs its handlers on threads."""
    ready = [True]
    health = ThreadedHealthService("alignloop.v1.PipelineService", lambda: ready[0], watch_interval_s=0.05)
    with thread_pool_server(health) as target:
        assert check(target) == SERVING and check(target, "alignloop.v1.PipelineService") == SERVING
        assert check(target, "nope") is None  # NOT_FOUND
        with grpc.insecure_channel(target) as channel:
            watch = pb_grpc.HealthStub(channel).Watch(pb.HealthCheckRequest(service=""), timeout=10)
            assert next(watch).status == SERVING
            ready[0] = False
            assert next(watch).status == NOT_SERVING
            watch.cancel()
        health.stopping()
        ready[0] = True
        assert check(target) == NOT_SERVING and check(target, LIVENESS) == SERVING


def test_a_watch_on_a_stopping_thread_pool_server_waits_between_polls():
    """Once stopping, nothing changes any more: the watch holds its thread idle, polling once an interval."""
    health = ThreadedHealthService("alignloop.v1.PipelineService", lambda: True, watch_interval_s=0.05)
    polls = []
    status = health.status
    health.status = lambda service: (polls.append(service), status(service))[1]
    with thread_pool_server(health) as target:
        health.stopping()
        with grpc.insecure_channel(target) as channel:
            watch = pb_grpc.HealthStub(channel).Watch(pb.HealthCheckRequest(service=""), timeout=10)
            assert next(watch).status == NOT_SERVING
            time.sleep(0.5)
            watch.cancel()
    # About 10 polls in 0.5 s; a loop that did not wait would make many thousands.
    assert len(polls) <= 40, len(polls)
