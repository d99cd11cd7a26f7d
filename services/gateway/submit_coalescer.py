"""Single feedback submissions that arrive together share one gRPC Submit call.

Under load many requests arrive while a Submit is in flight; sending each alone would pay a gRPC round trip,
a store lookup in the collector and a Kafka wake-up per request. The coalescer keeps at most `max_in_flight`
calls going (one by default: fewer, larger calls; compare with benchmarks/feedback_ingest.py) and sends
whatever queued up meanwhile as one call per API key, with per-item outcomes
(all_or_nothing=False), so one bad item never fails its neighbours. A lone request goes out at once.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from alignloop.v1 import feedback_pb2 as pb
from alignloop.v1 import feedback_pb2_grpc as pb_grpc


class SubmitCoalescer:
    def __init__(self, stub: pb_grpc.FeedbackServiceStub, *, timeout_s: float, max_items: int = 256,
                 max_in_flight: int = 1) -> None:
        self.stub = stub
        self.timeout_s = timeout_s
        self.max_items = max_items
        self.max_in_flight = max_in_flight
        self._pending: list[tuple[str, pb.FeedbackItem, asyncio.Future]] = []
        self._in_flight = 0

    async def submit(self, api_key_hash: str, item: pb.FeedbackItem) -> pb.ItemResult:
        """The collector's verdict on `item`; raises grpc.aio.AioRpcError if the call failed."""
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((api_key_hash, item, fut))
        self._maybe_send()
        return await fut

    def _maybe_send(self) -> None:
        while self._pending and self._in_flight < self.max_in_flight:
            groups: dict[str, list[tuple[pb.FeedbackItem, asyncio.Future]]] = defaultdict(list)
            left = []
            seen: set[str] = set()
            taken = 0
            for key, item, fut in self._pending:
                # A repeated feedback id (two concurrent retries) waits for the next call: within one call
                # the collector would reject it as a duplicate instead of treating it as a retry.
                if taken >= self.max_items or item.feedback_id in seen:
                    left.append((key, item, fut))
                    continue
                seen.add(item.feedback_id)
                groups[key].append((item, fut))
                taken += 1
            self._pending = left
            for key, entries in groups.items():
                self._in_flight += 1
                asyncio.ensure_future(self._send(key, entries))

    async def _send(self, api_key_hash: str, entries: list[tuple[pb.FeedbackItem, asyncio.Future]]) -> None:
        try:
            response = await self.stub.Submit(
                # No waiting for completion records here: an item whose completion is not stored yet comes back
                # NOT_FOUND at once, and the caller retries it alone, so it never delays its neighbours.
                pb.SubmitRequest(api_key_hash=api_key_hash, items=[item for item, _ in entries],
                                 all_or_nothing=False, completion_wait_s=0),
                timeout=self.timeout_s,
                wait_for_ready=True,  # a collector restarting for a moment delays requests instead of failing them
            )
        except Exception as exc:  # grpc.aio.AioRpcError, or cancellation at shutdown
            for _, fut in entries:
                if not fut.done():
                    fut.set_exception(exc)
        else:
            for (_, fut), result in zip(entries, response.results):
                if not fut.done():
                    fut.set_result(result)
        finally:
            self._in_flight -= 1
            self._maybe_send()
