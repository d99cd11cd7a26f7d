"""The gRPC FeedbackService: validate against the completion records, produce to Kafka, answer after the ack."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass

from prometheus_client import Counter
from sqlalchemy import Engine, select, text

from alignloop import tracing
from alignloop.store import key_in
from alignloop.store.schema import Feedback
from alignloop.topics import FeedbackRecordV1
from alignloop.v1 import feedback_pb2 as pb
from alignloop.v1 import feedback_pb2_grpc as pb_grpc
from services.feedback import stats, usage
from services.feedback.completions import CompletionIndex, CompletionRef
from services.feedback.producer import FeedbackProducer

log = logging.getLogger("alignloop.feedback.collector")

ITEMS = Counter("alignloop_feedback_items_total", "Submitted feedback items, by outcome.", ["outcome"])

KINDS = {pb.THUMBS: "thumbs", pb.RATING: "rating", pb.RANKING: "ranking", pb.COMPARISON: "comparison"}


@dataclass
class Verdict:
    outcome: int
    param: str = ""
    message: str = ""
    accepted_at: float = 0.0

    def result(self, feedback_id: str) -> pb.ItemResult:
        return pb.ItemResult(feedback_id=feedback_id, outcome=self.outcome, param=self.param,
                             message=self.message, accepted_at=self.accepted_at)


def check_shape(item: pb.FeedbackItem, max_ranking: int) -> Verdict | None:
    """What can be checked without the store. The gateway checks all of it too; this guards the contract."""
    ids = list(item.completion_ids)
    if not item.feedback_id:
        return Verdict(pb.INVALID, "feedback_id", "feedback_id is required")
    if item.kind not in KINDS:
        return Verdict(pb.INVALID, "kind", "kind must be thumbs, rating, ranking or comparison")
    if any(not i for i in ids) or len(set(ids)) != len(ids):
        return Verdict(pb.INVALID, "completion_ids", "completion ids must be non-empty and distinct")
    if item.kind == pb.THUMBS:
        if len(ids) != 1 or not item.HasField("thumbs_up"):
            return Verdict(pb.INVALID, "value", "thumbs needs one completion id and a value")
    elif item.kind == pb.RATING:
        if len(ids) != 1 or not item.HasField("rating") or not 1 <= item.rating <= 7:
            return Verdict(pb.INVALID, "value", "rating needs one completion id and a value from 1 to 7")
    elif item.kind == pb.RANKING:
        if not 2 <= len(ids) <= max_ranking:
            return Verdict(pb.INVALID, "completion_ids", f"a ranking needs 2 to {max_ranking} completion ids")
    elif item.kind == pb.COMPARISON:
        if len(ids) != 2:
            return Verdict(pb.INVALID, "completion_ids", "a comparison needs exactly 2 completion ids")
        if item.preferred_completion_id not in ids:
            return Verdict(pb.INVALID, "preferred", "preferred must be one of completion_ids")
    return None


def check_completions(item: pb.FeedbackItem, api_key_hash: str,
                      refs: dict[str, CompletionRef]) -> Verdict | None:
    """Each id exists and belongs to the caller; several ids answer one prompt. Another tenant's id is
    reported exactly like one that does not exist."""
    ids = list(item.completion_ids)
    for i, cid in enumerate(ids):
        ref = refs.get(cid)
        if ref is None or ref.api_key_hash != api_key_hash:
            return Verdict(pb.NOT_FOUND, f"completion_ids[{i}]", f"No completion '{cid}' found for this API key.")
    if len({refs[cid].prompt_hash for cid in ids}) > 1:
        return Verdict(pb.INVALID, "completion_ids", "The ranked or compared completions must answer the same prompt.")
    return None


def to_record(item: pb.FeedbackItem, api_key_hash: str, refs: dict[str, CompletionRef],
              accepted_at: float) -> FeedbackRecordV1:
    ids = list(item.completion_ids)
    first = refs[ids[0]]
    return FeedbackRecordV1(
        feedback_id=item.feedback_id,
        client_feedback_id=item.client_feedback_id or None,
        request_id=item.request_id or None,
        request_hash=item.request_hash,
        api_key_hash=api_key_hash,
        kind=KINDS[item.kind],
        completion_ids=ids,
        thumbs_up=item.thumbs_up if item.HasField("thumbs_up") else None,
        rating=item.rating if item.HasField("rating") else None,
        preferred_completion_id=item.preferred_completion_id or None,
        comment=item.comment or None,
        correction=item.correction or None,
        fails_instruction=item.fails_instruction,
        hallucination=item.hallucination,
        inappropriate=item.inappropriate,
        prompt_hash=first.prompt_hash,
        model_name=first.model_name,
        model_versions=[refs[i].model_version for i in ids],
        created_at=item.created_at or accepted_at,
        accepted_at=accepted_at,
    )


class IdempotencyLedger:
    """Which idempotent feedback ids were used, and with which request hash.

    Recent ids live in memory, including those still in flight, so concurrent retries of one key wait for the
    first attempt instead of racing it; older ones are looked up in the store. If an id was produced but is not
    stored yet when this process restarts, a retry produces it again and the store's unique key keeps one copy.
    """

    def __init__(self, engine: Engine, executor: Executor, max_recent: int = 100_000) -> None:
        self.engine = engine
        self.executor = executor
        self.max_recent = max_recent
        self._recent: dict[str, tuple[str, asyncio.Future]] = {}

    def claim(self, feedback_id: str, request_hash: str) -> tuple[str, asyncio.Future] | None:
        """Registers an attempt. Returns None when this attempt owns the id now, else the earlier entry."""
        entry = self._recent.get(feedback_id)
        if entry is not None:
            return entry
        self._trim()
        self._recent[feedback_id] = (request_hash, asyncio.get_running_loop().create_future())
        return None

    def settle(self, feedback_id: str, verdict: Verdict) -> None:
        """Ends the owner's attempt: accepted/replayed ones are remembered; others free the id again."""
        entry = self._recent.get(feedback_id)
        if entry is None:
            return
        _, fut = entry
        if not fut.done():
            fut.set_result(verdict)
        if verdict.outcome not in (pb.ACCEPTED, pb.REPLAYED):
            del self._recent[feedback_id]

    async def stored(self, ids: list[str]) -> dict[str, tuple[str, float]]:
        if not ids:
            return {}
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._query, ids)

    def _query(self, ids: list[str]) -> dict[str, tuple[str, float]]:
        stmt = select(Feedback.feedback_id, Feedback.request_hash, Feedback.accepted_at)
        rows = []
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 1000):
                cond = key_in(self.engine.dialect.name, Feedback.feedback_id, ids[start:start + 1000])
                rows += conn.execute(stmt.where(cond)).all()
        return {fid: (h, at.timestamp()) for fid, h, at in rows}

    def _trim(self) -> None:
        while len(self._recent) >= self.max_recent:
            oldest = next(iter(self._recent))
            if not self._recent[oldest][1].done():
                return  # never forget an attempt in flight
            del self._recent[oldest]


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeedbackService"].full_name


class FeedbackServicer(pb_grpc.FeedbackServiceServicer):
    def __init__(self, engine: Engine, executor: Executor, producer: FeedbackProducer, *,
                 completion_wait_s: float, max_ranking: int, tracer=None) -> None:
        self.tracer = tracer  # None: tracing is off (alignloop/tracing.py)
        self.engine = engine
        self.executor = executor
        self.producer = producer
        self.completions = CompletionIndex(engine, executor, wait_s=completion_wait_s)
        self.ledger = IdempotencyLedger(engine, executor)
        self.max_ranking = max_ranking

    async def Submit(self, request: pb.SubmitRequest, context) -> pb.SubmitResponse:
        with tracing.grpc_server_span(self.tracer, SERVICE_NAME, "Submit", context,
                                      {"alignloop.items": len(request.items)}):
            return await self._submit(request, context)

    async def _submit(self, request: pb.SubmitRequest, context) -> pb.SubmitResponse:
        items = list(request.items)
        verdicts: list[Verdict | None] = [check_shape(it, self.max_ranking) for it in items]
        seen: set[str] = set()
        for i, it in enumerate(items):
            if verdicts[i] is None and it.feedback_id in seen:
                verdicts[i] = Verdict(pb.INVALID, "feedback_id", "feedback ids must be distinct within a request")
            seen.add(it.feedback_id)
        owned: list[int] = []  # idempotent items whose id this attempt claimed
        try:
            await self._check_idempotency(items, verdicts, owned)
            wait_s = request.completion_wait_s if request.HasField("completion_wait_s") else None
            refs = await self.completions.get_many(
                [cid for it, v in zip(items, verdicts) if v is None for cid in it.completion_ids], wait_s)
            for i, it in enumerate(items):
                if verdicts[i] is None:
                    verdicts[i] = check_completions(it, request.api_key_hash, refs)
            failed = any(v is not None and v.outcome not in (pb.REPLAYED,) for v in verdicts)
            if request.all_or_nothing and failed:
                verdicts = [v or Verdict(pb.NOT_ATTEMPTED, message="another item was rejected") for v in verdicts]
            else:
                await self._produce(request.api_key_hash, items, verdicts, refs)
        finally:
            for i in owned:
                self.ledger.settle(items[i].feedback_id, verdicts[i] or Verdict(pb.FAILED, message="not processed"))
        for v in verdicts:
            ITEMS.labels(pb.Outcome.Name(v.outcome).lower()).inc()
        return pb.SubmitResponse(results=[v.result(it.feedback_id) for it, v in zip(items, verdicts)])

    async def _check_idempotency(self, items: list[pb.FeedbackItem], verdicts: list[Verdict | None],
                                 owned: list[int]) -> None:
        earlier: dict[int, tuple[str, asyncio.Future]] = {}
        for i, it in enumerate(items):
            if verdicts[i] is None and it.idempotent:
                entry = self.ledger.claim(it.feedback_id, it.request_hash)
                if entry is None:
                    owned.append(i)
                else:
                    earlier[i] = entry
        for i, (request_hash, fut) in earlier.items():
            if request_hash != items[i].request_hash:
                verdicts[i] = _conflict()
                continue
            first: Verdict = await asyncio.shield(fut)
            if first.outcome in (pb.ACCEPTED, pb.REPLAYED):
                verdicts[i] = Verdict(pb.REPLAYED, accepted_at=first.accepted_at)
            else:
                verdicts[i] = Verdict(pb.FAILED, message="A concurrent attempt with this idempotency key failed; "
                                                         "retry.")
        stored = await self.ledger.stored([items[i].feedback_id for i in owned])
        for i in owned:
            hit = stored.get(items[i].feedback_id)
            if hit is not None:
                request_hash, accepted_at = hit
                verdicts[i] = (Verdict(pb.REPLAYED, accepted_at=accepted_at)
                               if request_hash == items[i].request_hash else _conflict())

    async def _produce(self, api_key_hash: str, items: list[pb.FeedbackItem], verdicts: list[Verdict | None],
                       refs: dict[str, CompletionRef]) -> None:
        todo = [i for i, v in enumerate(verdicts) if v is None]
        if not todo:
            return
        accepted_at = time.time()
        records = [to_record(items[i], api_key_hash, refs, accepted_at) for i in todo]
        acks = await asyncio.gather(*self.producer.send(records), return_exceptions=True)
        for i, ack in zip(todo, acks):
            if isinstance(ack, BaseException):
                log.error("Kafka did not acknowledge feedback %s: %r", items[i].feedback_id, ack)
                verdicts[i] = Verdict(pb.FAILED, message=f"Kafka did not acknowledge the feedback ({ack!r}); "
                                                         "retry with the same idempotency key.")
            else:
                verdicts[i] = Verdict(pb.ACCEPTED, accepted_at=accepted_at)

    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        loop = asyncio.get_running_loop()
        rows, served = await asyncio.gather(
            loop.run_in_executor(self.executor, stats.query, self.engine, request.days),
            loop.run_in_executor(self.executor, stats.served, self.engine, request.days))
        return pb.StatsResponse(rows=rows, served=served)

    async def Usage(self, request: pb.UsageRequest, context) -> pb.UsageResponse:
        rows = await asyncio.get_running_loop().run_in_executor(self.executor, usage.query, self.engine,
                                                                request.days)
        return pb.UsageResponse(rows=rows)

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        ready, detail = await self.readiness()
        return pb.HealthResponse(ready=ready, detail=detail)

    async def readiness(self) -> tuple[bool, str]:
        """Ready: the producer reaches Kafka and the store answers; (ready, why not)."""
        # Not on the store's executor: while Kafka is down a recheck takes seconds.
        if not self.producer.healthy() and not await asyncio.to_thread(self.producer.recheck):
            return False, "Kafka is not reachable, or the last send failed"
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self._ping)
        except Exception as exc:  # any driver error means: not ready
            return False, f"store: {exc!r}"
        return True, ""

    async def ready(self) -> bool:
        """grpc.health.v1 readiness (see `readiness`)."""
        return (await self.readiness())[0]

    def _ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))


def _conflict() -> Verdict:
    return Verdict(pb.CONFLICT, "idempotency_key",
                   "This idempotency key was already used with a different request body.")
