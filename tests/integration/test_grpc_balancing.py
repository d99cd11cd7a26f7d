"""The gateway's gRPC channels on real gRPC servers: calls are spread over every replica the target resolves to,
servers recycle connections (so that clients resolve again) without failing a call, and a replica that stops
hands its share to the others."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest

from alignloop.grpc_channels import AFFINITY_HEADER, balanced_channel, retrying_channel
from alignloop.grpc_health import HealthService
from alignloop.grpc_serving import start_server
from alignloop.v1 import policy_pb2 as pb
from alignloop.v1 import policy_pb2_grpc as pb_grpc
from tests.conftest import free_ports

pytestmark = pytest.mark.integration

STREAM_MESSAGES = 15


def _affinity(value: str) -> tuple[tuple[str, str], ...]:
    return ((AFFINITY_HEADER, value),)


class Replica(pb_grpc.PolicyServiceServicer):
    """Answers every call, counting them and the connections (client ports) they came on."""

    def __init__(self, name: str, stream_pause_s: float = 0.0) -> None:
        self.name = name
        self.health = HealthService("alignloop.v1.PolicyService", _ready, watch_interval_s=0.1)
        self.stream_pause_s = stream_pause_s
        self.calls = 0
        self.peers: set[str] = set()

    def _count(self, context) -> None:
        self.calls += 1
        self.peers.add(context.peer())

    async def Generate(self, request, context):
        self._count(context)
        return pb.GenerateResponse(completions=[pb.Completion(text=self.name)], model=pb.ModelRef(name=self.name))

    async def GenerateStream(self, request, context):
        self._count(context)
        yield pb.GenerateStreamResponse(model=pb.ModelRef(name=self.name))
        for i in range(STREAM_MESSAGES):
            await asyncio.sleep(self.stream_pause_s)
            yield pb.GenerateStreamResponse(deltas=[pb.Completion(text=str(i))])


async def _ready() -> bool:
    return True


@contextlib.asynccontextmanager
async def replicas(count: int, max_connection_age_s: float = 0.0,
                   stream_pause_s: float = 0.0) -> AsyncIterator[tuple[list[Replica], list[grpc.aio.Server], str]]:
    """`count` real gRPC servers on free ports, and one target that resolves to all of them (gRPC's `ipv4:`
    scheme takes a list of addresses, as DNS gives for a headless Service)."""
    ports = free_ports(count)
    servicers = [Replica(f"replica-{i}", stream_pause_s) for i in range(count)]
    servers = []
    for servicer, port in zip(servicers, ports):
        servers.append(await start_server(f"127.0.0.1:{port}",
                                          lambda srv, s=servicer: pb_grpc.add_PolicyServiceServicer_to_server(s, srv),
                                          health=servicer.health, max_connection_age_s=max_connection_age_s))
    try:
        yield servicers, servers, "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
    finally:
        await asyncio.gather(*(server.stop(None) for server in servers))


@pytest.mark.parametrize("make_channel", [retrying_channel, balanced_channel], ids=["retrying", "canary"])
def test_calls_are_spread_over_every_replica(make_channel):
    async def scenario():
        async with replicas(3) as (servicers, _, target):
            async with make_channel(target) as channel:
                policy = pb_grpc.PolicyServiceStub(channel)
                answered = Counter()
                for _ in range(60):
                    answered[(await policy.Generate(pb.GenerateRequest(), timeout=10)).model.name] += 1
                for _ in range(15):
                    async for first in policy.GenerateStream(pb.GenerateRequest(), timeout=10):
                        answered[first.model.name] += 1
                        break
            # Round robin, after the connections came up one by one: about 25 each. A plain channel
            # (pick_first) sends all 75 to one replica.
            assert sorted(answered) == ["replica-0", "replica-1", "replica-2"], answered
            assert min(answered.values()) >= 15, answered
            assert all(len(s.peers) == 1 for s in servicers)  # one connection per replica, reused

    asyncio.run(scenario())


def test_a_plain_channel_sends_everything_to_one_replica():
    """What the balancing fixes: gRPC's default policy uses the first address that connects, for every call."""
    async def scenario():
        async with replicas(3) as (servicers, _, target):
            async with grpc.aio.insecure_channel(target) as channel:
                policy = pb_grpc.PolicyServiceStub(channel)
                for _ in range(30):
                    await policy.Generate(pb.GenerateRequest(), timeout=10)
            assert sorted(s.calls for s in servicers) == [0, 0, 30]

    asyncio.run(scenario())


def test_servers_recycle_connections_without_failing_a_call():
    """With a maximum connection age the server moves its clients to new connections (which is when they
    resolve the service again); calls keep succeeding, and a stream that outlives the age still ends whole."""
    async def scenario():
        async with replicas(1, max_connection_age_s=0.3, stream_pause_s=0.1) as ([servicer], _, target):
            async with retrying_channel(target) as channel:
                policy = pb_grpc.PolicyServiceStub(channel)

                async def long_stream() -> int:
                    # 15 pauses of 0.1 s: about five times the connection's age.
                    return sum([1 async for m in policy.GenerateStream(pb.GenerateRequest(), timeout=20)
                                if m.deltas])

                async def unary_calls() -> int:
                    done = 0
                    for _ in range(80):
                        await policy.Generate(pb.GenerateRequest(), timeout=10)
                        done += 1
                        await asyncio.sleep(0.02)
                    return done

                streamed, *unary = await asyncio.gather(long_stream(), unary_calls(), unary_calls())
            assert streamed == STREAM_MESSAGES
            assert unary == [80, 80]
            # Without the age every call would share one connection.
            assert len(servicer.peers) >= 3, servicer.peers

    asyncio.run(scenario())


@pytest.mark.parametrize("affinity", [False, True], ids=["round-robin", "affinity"])
def test_a_replica_that_stops_hands_its_share_to_the_others(affinity):
    """A rolling update through a balanced channel: one replica drains and stops while calls keep coming; no
    call fails, and the rest go to the replica still up. With affinity, each call is a conversation of its own,
    so both replicas have some until one stops."""
    async def scenario():
        async with replicas(2) as (servicers, servers, target):
            async with retrying_channel(target, affinity=affinity) as channel:
                policy = pb_grpc.PolicyServiceStub(channel)
                failures = []

                async def caller(c: int) -> None:
                    for i in range(60):
                        try:
                            await policy.Generate(pb.GenerateRequest(), timeout=10,
                                                  metadata=_affinity(f"c{c}-{i}") if affinity else None)
                        except grpc.aio.AioRpcError as exc:
                            failures.append(exc.code())
                        await asyncio.sleep(0.01)

                callers = [asyncio.create_task(caller(c)) for c in range(4)]
                await asyncio.sleep(0.3)
                assert servicers[0].calls > 0
                # The drain, as ALIGNLOOP_DRAIN_S gives it: calls in flight finish (a loaded machine may take a
                # while to run their handlers), new ones are refused and retried on the other replica.
                await servers[0].stop(grace=10.0)
                stopped_with = servicers[0].calls
                await asyncio.gather(*callers)
            assert failures == []
            assert servicers[0].calls == stopped_with  # nothing reached it once it had stopped
            assert servicers[1].calls > 120
            assert servicers[0].calls + servicers[1].calls == 240

    asyncio.run(scenario())


@pytest.mark.parametrize("health_checked", [True, False], ids=["health-checked", "plain"])
def test_a_replica_that_says_it_is_stopping_gets_no_more_calls(health_checked):
    """With health checking, a replica that reports NOT_SERVING (it got SIGTERM, or its engine died) is left
    out at once, before its drain refuses anything; a channel without it keeps sending it a third."""
    async def scenario():
        async with replicas(3) as (servicers, _, target):
            async with retrying_channel(target, health_checked=health_checked) as channel:
                policy = pb_grpc.PolicyServiceStub(channel)

                async def names(calls: int) -> Counter:
                    return Counter([(await policy.Generate(pb.GenerateRequest(), timeout=10)).model.name
                                    for _ in range(calls)])

                assert len(await names(30)) == 3
                servicers[0].health.stopping()
                if health_checked:
                    # The watch tells the channel at once; give it time to act on a loaded machine.
                    for _ in range(100):
                        if "replica-0" not in await names(6):
                            break
                else:
                    await asyncio.sleep(0.5)
                after = await names(60)
            if health_checked:
                assert "replica-0" not in after and min(after.values()) >= 15, after
            else:
                assert after["replica-0"] >= 15, after

    asyncio.run(scenario())


def test_a_server_without_the_health_service_still_gets_calls():
    """gRPC's rule, relied on for any server that predates grpc.health.v1: UNIMPLEMENTED counts as healthy."""
    async def scenario():
        port = free_ports(1)[0]
        servicer = Replica("bare")
        server = await start_server(f"127.0.0.1:{port}",
                                    lambda srv: pb_grpc.add_PolicyServiceServicer_to_server(servicer, srv))
        try:
            async with retrying_channel(f"127.0.0.1:{port}", health_checked=True) as channel:
                answer = await pb_grpc.PolicyServiceStub(channel).Generate(pb.GenerateRequest(), timeout=10)
            assert answer.model.name == "bare"
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_with_affinity_each_conversation_keeps_its_replica_and_conversations_spread():
    """Consistent hashing on the affinity header: every call of one conversation reaches one replica, unary or
    streamed, while 60 conversations share out over all three; a call without the header still gets answered."""
    async def scenario():
        async with replicas(3) as (servicers, _, target):
            async with retrying_channel(target, health_checked=True, affinity=True) as channel:
                policy = pb_grpc.PolicyServiceStub(channel)
                where: dict[str, set[str]] = {}
                for turn in range(4):
                    for c in range(60):
                        key = f"conversation-{c}"
                        if turn % 2:
                            async for first in policy.GenerateStream(pb.GenerateRequest(), timeout=10,
                                                                     metadata=_affinity(key)):
                                name = first.model.name
                                break
                        else:
                            name = (await policy.Generate(pb.GenerateRequest(), timeout=10,
                                                          metadata=_affinity(key))).model.name
                        where.setdefault(key, set()).add(name)
                assert (await policy.Generate(pb.GenerateRequest(), timeout=10)).model.name
            assert all(len(names) == 1 for names in where.values()), where
            per_replica = Counter(next(iter(names)) for names in where.values())
            # Shares near a third each: the smallest was 11 of 60 in 40 trials (replicas sit on the ring by
            # address, and the ports differ every run).
            assert sorted(per_replica) == ["replica-0", "replica-1", "replica-2"], per_replica
            assert min(per_replica.values()) >= 8, per_replica

    asyncio.run(scenario())


def test_with_affinity_a_stopping_replicas_conversations_move_and_the_others_stay():
    """When a replica reports NOT_SERVING, only the conversations that were on it move (each to one other
    replica, where it then stays); the rest keep theirs, so their prefix caches stay warm."""
    async def scenario():
        async with replicas(3) as (servicers, _, target):
            async with retrying_channel(target, health_checked=True, affinity=True) as channel:
                policy = pb_grpc.PolicyServiceStub(channel)

                async def placement() -> dict[str, str]:
                    return {key: (await policy.Generate(pb.GenerateRequest(), timeout=10,
                                                        metadata=_affinity(key))).model.name
                            for key in (f"conversation-{c}" for c in range(60))}

                before = await placement()
                assert "replica-0" in before.values()
                servicers[0].health.stopping()
                for _ in range(100):  # the watch tells the channel at once; a loaded machine may take a while
                    after = await placement()
                    if "replica-0" not in after.values():
                        break
                again = await placement()
            assert "replica-0" not in after.values()
            assert after == again  # the moved conversations stay where they went
            assert {k: v for k, v in after.items() if before[k] != "replica-0"} == \
                {k: v for k, v in before.items() if v != "replica-0"}

    asyncio.run(scenario())
