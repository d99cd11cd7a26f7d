"""Prefix-cache isolation: the salt the gateway gives each chat request (services/gateway/cache_salt.py), and
that every policy call of a request carries it, with fake gRPC stubs."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from pydantic import ValidationError

from alignloop.v1 import policy_pb2 as pb
from services.gateway.cache_salt import cache_salt
from services.gateway.chat import ChatService
from services.gateway.protocol import ChatCompletionRequest
from services.gateway.routing import CanaryState, PolicyRouter
from tests.unit.test_gateway import FakeLog, FakeStreamCall, FakeStub, rpc_error

MODEL = pb.ModelRef(name="alignloop-policy", version="1")


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="alignloop-policy", messages=[{"role": "user", "content": "hi"}], **kw)


def test_each_tenant_has_its_own_salt_and_a_request_salt_splits_it_further():
    salts = {cache_salt("tenant", "t1"), cache_salt("tenant", "t2"), cache_salt("tenant", "t1", "u1"),
             cache_salt("tenant", "t1", "u2"), cache_salt("tenant", "t2", "u1")}
    assert len(salts) == 5 and all(len(s) == 64 for s in salts)
    assert cache_salt("tenant", "t1") == cache_salt("tenant", "t1", None) == cache_salt("tenant", "t1", "")
    # No request salt makes another tenant's: the tenant's part is not the caller's to choose.
    assert cache_salt("tenant", "t1", "x") != cache_salt("tenant", "t1x") != cache_salt("tenant", "t1", "\0x")


def test_a_shared_cache_salts_only_the_requests_that_ask():
    assert cache_salt("shared", "t1") == cache_salt("shared", "t2") == ""
    assert cache_salt("shared", "t1", "u1") == cache_salt("shared", "t2", "u1") != ""
    assert cache_salt("shared", "t1", "u1") not in {cache_salt("tenant", "t1", "u1"), cache_salt("shared", "t1", "u2")}


def test_a_request_salt_must_not_be_empty():
    with pytest.raises(ValidationError) as err:
        chat(cache_salt="")
    assert err.value.errors()[0]["loc"] == ("cache_salt",)


def unary_stub() -> FakeStub:
    return FakeStub(unary=pb.GenerateResponse(
        completions=[pb.Completion(index=0, text="hello", token_ids=[1], finish_reason="stop")],
        prompt_tokens=3, model=MODEL))


@pytest.mark.parametrize("scope", ["tenant", "shared"])
def test_unary_and_stream_calls_carry_the_requests_salt(scope):
    stub = unary_stub()
    service = ChatService(PolicyRouter(stub), FakeLog(), 10, cache_scope=scope)
    asyncio.run(service.complete(chat(), "t1"))
    asyncio.run(service.complete(chat(cache_salt="u1"), "t1"))
    stub.stream = FakeStreamCall([pb.GenerateStreamResponse(prompt_tokens=3, model=MODEL)])

    async def stream() -> None:
        async for _ in await service.stream(chat(stream=True), "t2"):
            pass

    asyncio.run(stream())
    assert [r.cache_salt for r in stub.sent] == [cache_salt(scope, "t1"), cache_salt(scope, "t1", "u1"),
                                                cache_salt(scope, "t2")]


def test_the_champions_fallback_for_a_failed_challenger_carries_the_same_salt():
    champion = unary_stub()
    challenger = FakeStub(unary=rpc_error(grpc.StatusCode.UNAVAILABLE, "gone"))
    router = PolicyRouter(champion, challenger, rng=lambda: 0.0)
    router.state = CanaryState(version="2", percent=100, ready=True)
    asyncio.run(ChatService(router, FakeLog(), 10).complete(chat(), "t1"))
    assert [r.cache_salt for r in challenger.sent + champion.sent] == [cache_salt("tenant", "t1")] * 2
