"""grpc.health.v1 Watch (alignloop/grpc_health.py) driven step by step, without a server, so that the one
interleaving a real server only hits now and then can be forced: the service starts to stop while the stream
is still sending its last status."""

from __future__ import annotations

import asyncio

import pytest

from alignloop.grpc_health import NOT_SERVING, SERVING, HealthService, ThreadedHealthService
from alignloop.v1 import health_pb2 as pb

NAME = "alignloop.v1.PolicyService"


async def _ready() -> bool:
    return True


class _ActiveContext:
    def is_active(self) -> bool:
        return True


def test_a_stop_during_the_send_of_the_last_status_is_sent_not_slept_through() -> None:
    async def scenario() -> list[int]:
        health = HealthService(NAME, _ready, watch_interval_s=3600)
        watch = health.Watch(pb.HealthCheckRequest(service=NAME), None)
        first = await watch.__anext__()  # the generator is now paused at its yield: the send
        health.stopping()
        second = await asyncio.wait_for(watch.__anext__(), 5)
        await watch.aclose()
        return [first.status, second.status]

    assert asyncio.run(scenario()) == [SERVING, NOT_SERVING]


@pytest.mark.timeout(10)  # the bug sleeps through the whole hour-long interval
def test_the_threaded_watch_sends_a_stop_that_came_during_a_send() -> None:
    health = ThreadedHealthService(NAME, lambda: True, watch_interval_s=3600)
    watch = health.Watch(pb.HealthCheckRequest(service=NAME), _ActiveContext())
    assert next(watch).status == SERVING
    health.stopping()
    assert next(watch).status == NOT_SERVING  # before: a sleep of the whole interval first
    watch.close()
