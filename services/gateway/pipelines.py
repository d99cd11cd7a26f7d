"""The pipeline routes' logic: ask the pipeline runner over gRPC; turn its runs and errors into HTTP ones."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import grpc

from alignloop.contracts import RUN_ID_METADATA_KEY
from alignloop.v1 import pipeline_pb2 as pb
from alignloop.v1 import pipeline_pb2_grpc as pb_grpc
from services.gateway.errors import ApiError, from_rpc_error
from services.gateway.pipeline_protocol import PipelineRun, PipelineRunList, PipelineStep, StartRunRequest

log = logging.getLogger("alignloop.gateway")

SERVICE = "pipeline runner"


def iso_time(ts: float) -> str | None:
    """Unix seconds as ISO-8601 UTC ("2025-01-31T12:00:00.123Z"); None for 0 (not yet)."""
    if not ts:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_object(text: str, what: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        log.warning("the pipeline runner sent a %s that is not a JSON object: %.200s", what, text)
        return {}
    return value


def step_from_pb(step: pb.PipelineStep) -> PipelineStep:
    return PipelineStep(
        name=step.name, status=step.status, started_at=iso_time(step.started_at),
        finished_at=iso_time(step.finished_at), detail=step.detail, log_path=step.log_path or None,
        mlflow_run_id=step.mlflow_run_id or None, summary=_json_object(step.summary_json, "step summary"),
        progress=step.progress,
    )


def run_from_pb(run: pb.PipelineRun) -> PipelineRun:
    return PipelineRun(
        id=run.run_id, status=run.status, trigger=run.trigger, reason=run.reason,
        created_at=iso_time(run.created_at), started_at=iso_time(run.started_at),
        finished_at=iso_time(run.finished_at), steps=[step_from_pb(s) for s in run.steps],
        mlflow_run_id=run.mlflow_run_id or None, error=run.error or None, outcome=run.outcome or None,
        config=_json_object(run.config_json, "run config"), requested_by=run.requested_by or None,
        promoted_policy_version=run.promoted_policy_version or None,
        promoted_reward_version=run.promoted_reward_version or None,
    )


def rpc_error(exc: grpc.aio.AioRpcError, run_id: str | None = None) -> ApiError:
    """The HTTP answer to a failed call to the runner; `run_id` is the run the call was about, if any."""
    code, details = exc.code(), exc.details() or exc.code().name
    if code == grpc.StatusCode.ALREADY_EXISTS:
        active = dict(exc.trailing_metadata() or ()).get(RUN_ID_METADATA_KEY) or ""
        message = (f"Pipeline run {active} is already queued or running (one run at a time): wait for it, or "
                   f"cancel it with POST /v1/admin/pipelines/runs/{active}/cancel." if active else
                   "A pipeline run is already queued or running (one run at a time).")
        return ApiError(409, message, code="pipeline_run_in_progress", run_id=active)
    if code == grpc.StatusCode.NOT_FOUND:
        return ApiError(404, f"No pipeline run '{run_id}'.", param="run_id", code="run_not_found")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return ApiError(409, f"Pipeline run {run_id} cannot be cancelled: {details}",
                        code="run_not_cancellable", run_id=run_id or "")
    return from_rpc_error(exc, SERVICE)


class PipelineApi:
    def __init__(self, stub: pb_grpc.PipelineServiceStub, timeout_s: float = 30.0) -> None:
        self.stub = stub
        self.timeout_s = timeout_s

    async def _call(self, method, request, run_id: str | None = None):
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, run_id) from None

    async def start(self, body: StartRunRequest, key_hash: str) -> PipelineRun:
        run = await self._call(self.stub.StartRun, pb.StartRunRequest(
            trigger="operator", reason=body.reason, requested_by=key_hash,
            config_json=json.dumps(body.config) if body.config is not None else ""))
        log.info("pipeline run %s started by operator %s", run.run_id, key_hash)
        return run_from_pb(run)

    async def get(self, run_id: str) -> PipelineRun:
        return run_from_pb(await self._call(self.stub.GetRun, pb.GetRunRequest(run_id=run_id), run_id))

    async def list(self, limit: int) -> PipelineRunList:
        response = await self._call(self.stub.ListRuns, pb.ListRunsRequest(limit=limit))
        return PipelineRunList(data=[run_from_pb(r) for r in response.runs])

    async def cancel(self, run_id: str, key_hash: str) -> PipelineRun:
        run = await self._call(self.stub.CancelRun, pb.CancelRunRequest(run_id=run_id), run_id)
        log.info("pipeline run %s cancelled by operator %s", run_id, key_hash)
        return run_from_pb(run)
