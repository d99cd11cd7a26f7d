"""`GET /v1/admin/usage`: what each tenant used, for chargeback and capacity planning (services/feedback/usage.py
computes it from the store)."""

from __future__ import annotations

import grpc
from pydantic import BaseModel

from alignloop.v1 import feedback_pb2 as pb
from alignloop.v1 import feedback_pb2_grpc as pb_grpc
from services.gateway.errors import ApiError


class TenantUsage(BaseModel):
    tenant: str  # the tenant's id, as completion records and feedback carry it (api_key_hash)
    name: str | None  # its key's name in the credentials file; None once it has been revoked
    requests: int = 0
    completions: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, those the policy's engine found in its prefix cache
    completion_tokens: int = 0
    total_tokens: int = 0


class TenantDayUsage(TenantUsage):
    day: str  # YYYY-MM-DD, UTC


class UsageReport(BaseModel):
    days: int  # the last N UTC days, today included; 0: all time
    by_tenant: list[TenantUsage]  # most tokens first
    by_tenant_and_day: list[TenantDayUsage]  # oldest day first


def _add(into: TenantUsage, row: pb.UsageRow) -> None:
    into.requests += row.requests
    into.completions += row.completions
    into.prompt_tokens += row.prompt_tokens
    into.cached_prompt_tokens += row.cached_prompt_tokens
    into.completion_tokens += row.completion_tokens
    into.total_tokens += row.prompt_tokens + row.completion_tokens


async def usage_report(stub: pb_grpc.FeedbackServiceStub, days: int, names: dict[str, str]) -> UsageReport:
    """The report for the last `days` days, tenants named from `names` (tenant id -> key name)."""
    try:
        response = await stub.Usage(pb.UsageRequest(days=days), timeout=30)
    except grpc.aio.AioRpcError as exc:
        raise ApiError(503, f"feedback collector: {exc.details() or exc.code().name}",
                       "service_unavailable") from None
    totals: dict[str, TenantUsage] = {}
    per_day = []
    for row in response.rows:
        name = names.get(row.tenant)
        _add(totals.setdefault(row.tenant, TenantUsage(tenant=row.tenant, name=name)), row)
        _add(day := TenantDayUsage(tenant=row.tenant, name=name, day=row.day), row)
        per_day.append(day)
    return UsageReport(days=days, by_tenant=sorted(totals.values(), key=lambda t: (-t.total_tokens, t.tenant)),
                       by_tenant_and_day=per_day)
