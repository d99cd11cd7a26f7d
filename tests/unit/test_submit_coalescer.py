"""The gateway's SubmitCoalescer with a fake collector stub: grouping, ordering, errors."""

from __future__ import annotations

import asyncio

import pytest

from alignloop.v1 import feedback_pb2 as pb
from services.gateway.submit_coalescer import SubmitCoalescer


class FakeStub:
    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[pb.SubmitRequest] = []
        self.fail = fail
        self.gate = asyncio.Event()

    async def Submit(self, request: pb.SubmitRequest, timeout: float, wait_for_ready: bool) -> pb.SubmitResponse:
        self.calls.append(request)
        await self.gate.wait()
        if self.fail:
            raise self.fail
        return pb.SubmitResponse(results=[pb.ItemResult(feedback_id=i.feedback_id, outcome=pb.ACCEPTED)
                                          for i in request.items])


def item(fid: str) -> pb.FeedbackItem:
    return pb.FeedbackItem(feedback_id=fid, kind=pb.THUMBS, completion_ids=["c"], thumbs_up=True)


def test_requests_that_arrive_while_calls_are_in_flight_share_one_call():
    async def main():
        stub = FakeStub()
        co = SubmitCoalescer(stub, timeout_s=5, max_in_flight=1)
        first = asyncio.ensure_future(co.submit("k", item("a")))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(co.submit("k", item(f"b{i}"))) for i in range(10)]
        await asyncio.sleep(0)
        assert len(stub.calls) == 1  # the lone first request went out at once; the others wait for a slot
        stub.gate.set()
        results = await asyncio.gather(first, *rest)
        assert [r.feedback_id for r in results] == ["a"] + [f"b{i}" for i in range(10)]
        assert [len(c.items) for c in stub.calls] == [1, 10]
        assert not any(c.all_or_nothing for c in stub.calls)

    asyncio.run(main())


def test_keys_never_share_a_call_and_repeated_ids_wait_for_the_next_one():
    async def main():
        stub = FakeStub()
        co = SubmitCoalescer(stub, timeout_s=5, max_in_flight=8)
        stub.gate.set()
        co._in_flight = 8  # hold every slot so the requests queue up together
        futs = [asyncio.ensure_future(co.submit(k, item(f))) for k, f in
                [("k1", "x"), ("k2", "y"), ("k1", "x"), ("k1", "z")]]
        await asyncio.sleep(0)
        co._in_flight = 0
        co._maybe_send()
        results = await asyncio.gather(*futs)
        assert [r.feedback_id for r in results] == ["x", "y", "x", "z"]
        calls = [(c.api_key_hash, [i.feedback_id for i in c.items]) for c in stub.calls]
        assert sorted(calls) == sorted([("k1", ["x", "z"]), ("k2", ["y"]), ("k1", ["x"])])

    asyncio.run(main())


def test_a_failed_call_fails_every_request_in_it():
    async def main():
        stub = FakeStub(fail=RuntimeError("collector down"))
        co = SubmitCoalescer(stub, timeout_s=5, max_in_flight=1)
        futs = [asyncio.ensure_future(co.submit("k", item(f"i{n}"))) for n in range(3)]
        await asyncio.sleep(0)
        stub.gate.set()
        for fut in futs:
            with pytest.raises(RuntimeError, match="collector down"):
                await fut
        assert co._in_flight == 0

    asyncio.run(main())
