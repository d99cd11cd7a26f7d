"""The model-version routes' logic: the registry's view (from the pipeline runner), the feedback counts per
version (from the feedback collector) and what is served now (the policy router's canary state), side by side."""

from __future__ import annotations

import asyncio
import logging

import grpc

from alignloop.v1 import feedback_pb2, feedback_pb2_grpc
from alignloop.v1 import pipeline_pb2 as pb
from alignloop.v1 import pipeline_pb2_grpc as pb_grpc
from services.gateway.errors import ApiError, from_rpc_error
from services.gateway.feedback import summed
from services.gateway.model_protocol import (
    CanaryState,
    ModelAliases,
    ModelVersionEntry,
    ModelVersionList,
    PromoteRequest,
    SetCanaryRequest,
)
from services.gateway.pipelines import iso_time
from services.gateway.routing import PolicyRouter

log = logging.getLogger("alignloop.gateway")


def _rpc_error(exc: grpc.aio.AioRpcError, service: str) -> ApiError:
    details = exc.details() or exc.code().name
    if exc.code() == grpc.StatusCode.NOT_FOUND:
        return ApiError(404, details, param="version", code="model_version_not_found")
    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
        return ApiError(409, details, code="registry_busy")
    return from_rpc_error(exc, service)


def aliases_from_pb(a: pb.ModelAliases) -> ModelAliases:
    return ModelAliases(model=a.model, champion=a.champion or None, challenger=a.challenger or None,
                        canary_percent=a.canary_percent, previous_champion=a.previous_champion or None)


class ModelsApi:
    def __init__(self, pipeline: pb_grpc.PipelineServiceStub, feedback: feedback_pb2_grpc.FeedbackServiceStub,
                 router: PolicyRouter, policy_model_name: str, timeout_s: float = 30.0) -> None:
        self.pipeline = pipeline
        self.feedback = feedback
        self.router = router
        self.policy_model_name = policy_model_name
        self.timeout_s = timeout_s

    async def _registry(self, method, request):
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc, "pipeline runner") from None

    async def versions(self, days: int, limit: int) -> ModelVersionList:
        name = self.policy_model_name
        try:
            listed, stats = await asyncio.gather(
                self._registry(self.pipeline.ListModelVersions, pb.ListModelVersionsRequest(model=name, limit=limit)),
                self.feedback.Stats(feedback_pb2.StatsRequest(days=days), timeout=self.timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "feedback collector") from None
        served = {r.model_version: r for r in stats.served if r.model_name == name}
        rows: dict[str, list] = {}
        for r in stats.rows:
            if r.model_name == name:
                rows.setdefault(r.model_version, []).append(r)
        canary = self.router.state
        champion = next((v.version for v in listed.versions if "champion" in v.aliases), None)
        challenger = next((v.version for v in listed.versions if "challenger" in v.aliases), None)
        canary_share = canary.percent if canary.active and canary.version == challenger else 0

        def share(version: str) -> int:
            if version == champion:
                return 100 - canary_share
            return canary_share if version == challenger else 0

        return ModelVersionList(
            model=name, days=days, champion=champion,
            canary=CanaryState(version=challenger, percent=listed.canary_percent, serving=canary_share > 0),
            data=[ModelVersionEntry(
                version=v.version, aliases=list(v.aliases), created_at=iso_time(v.created_at),
                run_id=v.run_id or None, traffic_percent=share(v.version),
                responses=served[v.version].responses if v.version in served else 0,
                completions=served[v.version].completions if v.version in served else 0,
                feedback=summed(rows.get(v.version, [])), tags=dict(v.tags),
            ) for v in listed.versions])

    async def set_canary(self, body: SetCanaryRequest, key_hash: str) -> ModelAliases:
        out = await self._registry(self.pipeline.SetCanary, pb.SetCanaryRequest(
            version=body.version, percent=body.percent, reason=body.reason, requested_by=key_hash))
        log.info("canary set by operator %s: v%s at %d%%", key_hash, body.version, body.percent)
        return aliases_from_pb(out)

    async def clear_canary(self, key_hash: str) -> ModelAliases:
        out = await self._registry(self.pipeline.ClearCanary, pb.ClearCanaryRequest(requested_by=key_hash))
        log.info("canary ended by operator %s", key_hash)
        return aliases_from_pb(out)

    async def promote(self, body: PromoteRequest, key_hash: str) -> ModelAliases:
        out = await self._registry(self.pipeline.PromoteModel, pb.PromoteModelRequest(
            model=body.model or "", version=body.version, reason=body.reason, requested_by=key_hash))
        log.info("%s v%s promoted by operator %s", out.model, body.version, key_hash)
        return aliases_from_pb(out)

    async def rollback(self, model: str | None, key_hash: str) -> ModelAliases:
        out = await self._registry(self.pipeline.RollbackModel,
                                   pb.RollbackModelRequest(model=model or "", requested_by=key_hash))
        log.info("%s rolled back by operator %s", out.model, key_hash)
        return aliases_from_pb(out)
