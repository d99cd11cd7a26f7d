"""The feedback routes' logic: parse, name ids, ask the collector, turn its verdicts into HTTP answers."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import defaultdict

import grpc
from pydantic import ValidationError

from alignloop.config import Settings
from alignloop.v1 import feedback_pb2 as pb
from alignloop.v1 import feedback_pb2_grpc as pb_grpc
from services.gateway.errors import ApiError
from services.gateway.feedback_protocol import (
    FEEDBACK_BATCH,
    FEEDBACK_ITEM,
    KINDS,
    ComparisonFeedback,
    DayStats,
    FeedbackResult,
    FeedbackStats,
    ModelVersionDayStats,
    ModelVersionStats,
    RankingFeedback,
    RatingFeedback,
    StatsEntry,
    ThumbsFeedback,
    stable_hash,
)
from services.gateway.submit_coalescer import SubmitCoalescer

IDEMPOTENCY_HEADER = "Idempotency-Key"

_KIND_TO_PB = {"thumbs": pb.THUMBS, "rating": pb.RATING, "ranking": pb.RANKING, "comparison": pb.COMPARISON}

Item = ThumbsFeedback | RatingFeedback | RankingFeedback | ComparisonFeedback


def _param(loc: tuple) -> str:
    """('items', 3, 'thumbs', 'value') -> 'items[3].value' (the union's tag is not a field)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in KINDS:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_error(exc: ValidationError) -> ApiError:
    err = exc.errors(include_url=False)[0]
    kind, loc = err["type"], tuple(err.get("loc", ()))
    if kind == "json_invalid":
        return ApiError(400, f"The request body is not valid JSON: {err['msg']}", param="body")
    param = _param(loc)
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        param = f"{param}.kind" if param else "kind"
        return ApiError(400, f"{param}: must be one of {', '.join(KINDS)}", param=param)
    param = param or "body"
    return ApiError(400, f"{param}: {err['msg']}", param=param)


class FeedbackApi:
    def __init__(self, stub: pb_grpc.FeedbackServiceStub, settings: Settings) -> None:
        self.stub = stub
        self.settings = settings
        # Lookups may wait feedback_completion_wait_s for a completion record; Kafka acks take up to ~20 s.
        self.timeout_s = settings.feedback_completion_wait_s + 30
        self.coalescer = SubmitCoalescer(stub, timeout_s=self.timeout_s)

    # ---- parsing ----------------------------------------------------------------------------------------
    @staticmethod
    def _check_body(body: bytes) -> None:
        # Its size was capped while it was read (feedback_max_body_bytes, a 413).
        if not body.strip():
            raise ApiError(400, "The request body is empty; send a JSON object.", param="body")

    def _check_limits(self, item: Item, prefix: str) -> None:
        s = self.settings
        if isinstance(item, RankingFeedback) and len(item.completion_ids) > s.feedback_max_ranking:
            raise ApiError(400, f"{prefix}completion_ids: at most {s.feedback_max_ranking} completions can be "
                                "ranked at once", param=f"{prefix}completion_ids")
        for name in ("comment", "correction"):
            value = getattr(item, name)
            if value is not None and len(value) > s.feedback_max_text_chars:
                raise ApiError(400, f"{prefix}{name}: at most {s.feedback_max_text_chars} characters",
                               param=f"{prefix}{name}")

    def parse_single(self, body: bytes) -> Item:
        self._check_body(body)
        try:
            item = FEEDBACK_ITEM.validate_json(body)
        except ValidationError as exc:
            raise validation_error(exc) from None
        self._check_limits(item, "")
        return item

    def parse_batch(self, body: bytes) -> list[Item]:
        self._check_body(body)
        try:
            batch = FEEDBACK_BATCH.validate_json(body)
        except ValidationError as exc:
            raise validation_error(exc) from None
        if len(batch.items) > self.settings.feedback_batch_max:
            raise ApiError(400, f"items: at most {self.settings.feedback_batch_max} items per batch",
                           param="items")
        seen: dict[str, int] = {}
        for i, item in enumerate(batch.items):
            self._check_limits(item, f"items[{i}].")
            if item.feedback_id is not None:
                if item.feedback_id in seen:
                    raise ApiError(400, f"items[{i}].feedback_id: repeats items[{seen[item.feedback_id]}]",
                                   param=f"items[{i}].feedback_id")
                seen[item.feedback_id] = i
        return batch.items

    # ---- submitting -------------------------------------------------------------------------------------
    def _to_pb(self, item: Item, key_hash: str, now: float, batch_key: str | None, index: int,
               batch_hash: str | None, request_id: str | None) -> pb.FeedbackItem:
        if item.feedback_id is not None:
            feedback_id, idempotent = _derived_id(key_hash, "item", item.feedback_id), True
            request_hash = item.content_hash()
        elif batch_key is not None:
            # One key for a whole request: any change to the request is a conflict for every item.
            feedback_id, idempotent = _derived_id(key_hash, "request", batch_key, str(index)), True
            request_hash = stable_hash([batch_hash, index])
        else:
            feedback_id, idempotent = f"fb_{time.time_ns():x}{secrets.token_hex(6)}", False
            request_hash = item.content_hash()
        msg = pb.FeedbackItem(
            feedback_id=feedback_id, idempotent=idempotent, request_hash=request_hash,
            client_feedback_id=item.feedback_id or "", kind=_KIND_TO_PB[item.kind],
            comment=item.comment or "", correction=item.correction or "",
            fails_instruction=item.flags.fails_instruction, hallucination=item.flags.hallucination,
            inappropriate=item.flags.inappropriate, created_at=now, request_id=request_id or "",
        )
        if isinstance(item, ThumbsFeedback):
            msg.completion_ids.append(item.completion_id)
            msg.thumbs_up = item.value == "up"
        elif isinstance(item, RatingFeedback):
            msg.completion_ids.append(item.completion_id)
            msg.rating = item.value
        else:
            msg.completion_ids.extend(item.completion_ids)
            if isinstance(item, ComparisonFeedback):
                msg.preferred_completion_id = item.preferred
        return msg

    async def submit(self, items: list[Item], key_hash: str, idempotency_key: str | None,
                     *, batch: bool, request_id: str | None = None) -> tuple[list[FeedbackResult], bool]:
        """Returns the results and whether all of them are replays of an earlier, identical request.
        `request_id` (the HTTP request's X-Request-Id) is kept with each item; it is not part of what a replay
        must repeat, so a retry under a new request id replays the first result, and keeps the first id."""
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            raise ApiError(400, f"{IDEMPOTENCY_HEADER}: 1 to 255 characters", param=IDEMPOTENCY_HEADER)
        now = time.time()
        batch_hash = stable_hash([i.model_dump(mode="json") for i in items]) if idempotency_key else None
        messages = [self._to_pb(it, key_hash, now, idempotency_key, i, batch_hash, request_id)
                    for i, it in enumerate(items)]
        try:
            if batch:
                response = await self.stub.Submit(
                    pb.SubmitRequest(api_key_hash=key_hash, items=messages, all_or_nothing=True),
                    timeout=self.timeout_s,
                    wait_for_ready=True,  # a collector restarting for a moment delays requests, not fails them
                )
                results = list(response.results)
            else:
                results = [await self.coalescer.submit(key_hash, messages[0])]
                if results[0].outcome == pb.NOT_FOUND:
                    # Perhaps its completion record is still on its way to the store: ask again, alone and
                    # willing to wait for it (feedback_completion_wait_s).
                    response = await self.stub.Submit(
                        pb.SubmitRequest(api_key_hash=key_hash, items=messages, all_or_nothing=True),
                        timeout=self.timeout_s, wait_for_ready=True)
                    results = list(response.results)
        except grpc.aio.AioRpcError as exc:
            status = 504 if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else 503
            raise ApiError(status, f"feedback collector: {exc.details() or exc.code().name}; nothing was stored "
                                   "unless a retry with the same idempotency key says so.",
                           "service_unavailable") from None
        self._raise_first_error(results, items, batch)
        replayed = all(r.outcome == pb.REPLAYED for r in results)
        return [
            FeedbackResult(feedback_id=r.feedback_id, client_feedback_id=it.feedback_id, kind=it.kind,
                           completion_ids=list(m.completion_ids), created=int(r.accepted_at))
            for r, it, m in zip(results, items, messages)
        ], replayed

    @staticmethod
    def _raise_first_error(results, items: list[Item], batch: bool) -> None:
        # Rejections name the client's fault first; a failure to store is only reported if there is none.
        order = (pb.NOT_FOUND, pb.INVALID, pb.CONFLICT, pb.FAILED)
        for outcome in order:
            for i, r in enumerate(results):
                if r.outcome != outcome:
                    continue
                item = items[i]
                field = r.param
                if isinstance(item, ThumbsFeedback | RatingFeedback) and field.startswith("completion_ids"):
                    field = "completion_id"
                if outcome == pb.CONFLICT:
                    field = "feedback_id" if item.feedback_id is not None else IDEMPOTENCY_HEADER
                prefix = f"items[{i}]." if batch and field != IDEMPOTENCY_HEADER else ""
                param = f"{prefix}{field}" if field else None
                message = f"{param}: {r.message}" if param else r.message
                if outcome == pb.NOT_FOUND:
                    raise ApiError(404, message, param=param, code="completion_not_found")
                if outcome == pb.INVALID:
                    raise ApiError(400, message, param=param)
                if outcome == pb.CONFLICT:
                    raise ApiError(409, message, param=param, code="idempotency_key_reused")
                raise ApiError(503, r.message, "service_unavailable")
        if any(r.outcome not in (pb.ACCEPTED, pb.REPLAYED) for r in results):
            raise ApiError(502, "feedback collector: unexpected outcome", "api_error")

    # ---- analytics ---------------------------------------------------------------------------------------
    async def stats(self, days: int) -> FeedbackStats:
        try:
            response = await self.stub.Stats(pb.StatsRequest(days=days), timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise ApiError(503, f"feedback collector: {exc.details() or exc.code().name}",
                           "service_unavailable") from None
        by_version: dict[tuple[str, str], list] = defaultdict(list)
        by_day: dict[str, list] = defaultdict(list)
        for row in response.rows:
            by_version[(row.model_name, row.model_version)].append(row)
            by_day[row.day].append(row)
        return FeedbackStats(
            days=days,
            by_model_version=[ModelVersionStats(model_name=n, model_version=v, **summed(rows))
                              for (n, v), rows in sorted(by_version.items())],
            by_day=[DayStats(day=d, **summed(rows)) for d, rows in sorted(by_day.items())],
            by_model_version_and_day=[
                ModelVersionDayStats(model_name=r.model_name, model_version=r.model_version, day=r.day,
                                     **summed([r]))
                for r in response.rows
            ],
        )


def summed(rows) -> dict:
    """StatsRow protos added up, with the rates derived from the sums."""
    s = StatsEntry()
    rating_sum = 0.0
    for r in rows:
        s.total += r.total
        s.thumbs_up += r.thumbs_up
        s.thumbs_down += r.thumbs_down
        s.ratings += r.ratings
        rating_sum += r.rating_sum
        s.rankings += r.rankings
        s.comparisons += r.comparisons
        s.corrections += r.corrections
        s.flagged += r.flagged
    thumbs = s.thumbs_up + s.thumbs_down
    s.thumbs_up_rate = s.thumbs_up / thumbs if thumbs else None
    s.rating_mean = rating_sum / s.ratings if s.ratings else None
    return s.model_dump()


def _derived_id(key_hash: str, *parts: str) -> str:
    # Scoped by the API key: two tenants using the same idempotency key never meet.
    digest = hashlib.sha256("\x00".join((key_hash, *parts)).encode()).hexdigest()
    return f"fb_{digest[:32]}"
