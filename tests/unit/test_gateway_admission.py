"""Admission control through the gateway's app: caps on chat requests in flight, in all and per key, and every
way a request ends gives its place back."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from alignloop.config import Settings
from alignloop.credentials import Credentials, key_hash
from alignloop.v1 import policy_pb2 as pb
from services.gateway.app import create_app
from services.gateway.auth import KeyRing
from services.gateway.chat import ChatService
from services.gateway.routing import PolicyRouter
from tests.unit.test_gateway import MODEL, FakeLog, rpc_error

APP = {"Authorization": "Bearer a-key"}
OTHER = {"Authorization": "Bearer o-key"}  # the operator key: another caller, allowed on /v1 too
CHAT = {"model": "alignloop-policy", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = pb.Completion(index=0, text="Hi", token_ids=[5], finish_reason="stop")


class HeldStream:
    """A policy stream that sends its answer only once `release` is set."""

    def __init__(self, release: asyncio.Event) -> None:
        self.release, self.sent = release, 0

    async def read(self):
        self.sent += 1
        if self.sent == 1:
            return pb.GenerateStreamResponse(prompt_tokens=3, model=MODEL)
        if self.sent == 2:
            await self.release.wait()
            return pb.GenerateStreamResponse(deltas=[ANSWER])
        return grpc.aio.EOF

    def cancel(self) -> None:
        pass


class HeldPolicy:
    """Answers every call once `release` is set; `fail` makes the next unary call a policy error."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.fail: grpc.aio.AioRpcError | None = None

    async def Generate(self, req, timeout=None, metadata=None):
        if self.fail is not None:
            raise self.fail
        await self.release.wait()
        return pb.GenerateResponse(completions=[ANSWER], prompt_tokens=3, model=MODEL)

    def GenerateStream(self, req, timeout=None, metadata=None):
        return HeldStream(self.release)


def gateway(**caps):
    app = create_app(Settings(_env_file=None, **caps))
    app.state.keys = KeyRing(Credentials(app_key="a-key", operator_key="o-key"))
    policy = HeldPolicy()
    app.state.chat = ChatService(PolicyRouter(policy), FakeLog(), 10)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
    return app, policy, client


async def started(task: asyncio.Task, app, in_flight: int) -> None:
    """Waits until the app holds `in_flight` chat requests (the task is blocked in the policy call)."""
    for _ in range(200):
        if app.state.admission.total == in_flight:
            return
        assert not task.done(), task.result().text
        await asyncio.sleep(0.005)
    raise AssertionError(f"{app.state.admission.total} in flight, not {in_flight}")


@pytest.mark.parametrize("stream", [False, True])
def test_a_key_past_its_cap_gets_a_429_while_other_keys_go_on(stream):
    async def scenario():
        app, policy, client = gateway(max_chats_in_flight_per_key=1)
        body = {**CHAT, "stream": stream}
        first = asyncio.create_task(client.post("/v1/chat/completions", json=body, headers=APP))
        await started(first, app, 1)
        refused = await client.post("/v1/chat/completions", json=body, headers=APP)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "too_many_concurrent_requests")
        other = asyncio.create_task(client.post("/v1/chat/completions", json=body, headers=OTHER))
        await started(other, app, 2)
        policy.release.set()
        assert [(await t).status_code for t in (first, other)] == [200, 200]
        assert app.state.admission.total == 0 and not app.state.admission.by_key
        # Its place is back: the key is served again.
        assert (await client.post("/v1/chat/completions", json=body, headers=APP)).status_code == 200

    asyncio.run(scenario())


def test_the_gateway_cap_is_a_503_for_every_key():
    async def scenario():
        app, policy, client = gateway(max_chats_in_flight=1)
        first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT, headers=APP))
        await started(first, app, 1)
        refused = await client.post("/v1/chat/completions", json=CHAT, headers=OTHER)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "server_overloaded"
        policy.release.set()
        assert (await first).status_code == 200

    asyncio.run(scenario())


def test_a_request_that_fails_or_is_abandoned_gives_its_place_back():
    async def scenario():
        app, policy, client = gateway(max_chats_in_flight_per_key=1)
        # The caller goes away mid-stream (its task is cancelled, as when a connection drops).
        gone = asyncio.create_task(client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=APP))
        await started(gone, app, 1)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert app.state.admission.total == 0
        # A request the policy refuses.
        policy.fail = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "prompt too long", "messages")
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=APP)).status_code == 400
        assert app.state.admission.total == 0
        # Refused before admission: bad input is never counted.
        assert (await client.post("/v1/chat/completions", json={**CHAT, "n": 99}, headers=APP)).status_code == 400
        policy.fail = None
        policy.release.set()
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=APP)).status_code == 200
        assert app.state.admission.total == 0 and not app.state.admission.by_key

    asyncio.run(scenario())


def test_zero_means_no_cap():
    async def scenario():
        app, policy, client = gateway(max_chats_in_flight=0, max_chats_in_flight_per_key=0)
        tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=CHAT, headers=APP)) for _ in range(20)]
        await started(tasks[0], app, 20)
        policy.release.set()
        assert {(await t).status_code for t in tasks} == {200}
        assert app.state.admission.by_key == {}

    asyncio.run(scenario())


def test_in_flight_counts_are_per_key_hash():
    app, _, _ = gateway()
    admission = app.state.admission
    admission.enter({}, key_hash("a-key"))
    assert admission.by_key == {key_hash("a-key"): 1}
    admission.leave(key_hash("a-key"))
    assert admission.total == 0 and admission.by_key == {}
