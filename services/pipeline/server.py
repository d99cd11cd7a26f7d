"""PipelineService over gRPC (proto/alignloop/v1/pipeline.proto), a thin face on the Runner."""

from __future__ import annotations

import json

import grpc

from alignloop.contracts import PARAM_METADATA_KEY, RUN_ID_METADATA_KEY
from alignloop.registry import ModelNotRegistered
from alignloop.store.schema import PipelineRun
from alignloop.v1 import pipeline_pb2 as pb
from alignloop.v1 import pipeline_pb2_grpc as pb_grpc
from services.pipeline.config import ConfigError
from services.pipeline.model_ops import BadRequest, ModelOps, Refused
from services.pipeline.runner import NotCancellable, Runner
from services.pipeline.runs import RunInProgress, steps_of, timestamp

TRIGGERS = ("operator", "schedule", "feedback")


def to_proto(run: PipelineRun) -> pb.PipelineRun:
    steps = [pb.PipelineStep(name=st.name, status=st.status, started_at=st.started_at, finished_at=st.finished_at,
                             detail=st.detail, log_path=st.log_path, mlflow_run_id=st.mlflow_run_id,
                             summary_json=json.dumps(st.summary) if st.summary is not None else "",
                             progress=st.progress)
             for st in steps_of(run)]
    return pb.PipelineRun(run_id=run.run_id, status=run.status, trigger=run.trigger, reason=run.reason or "",
                          created_at=timestamp(run.created_at), started_at=timestamp(run.started_at),
                          finished_at=timestamp(run.finished_at), steps=steps,
                          mlflow_run_id=run.mlflow_run_id or "", error=run.error or "", outcome=run.outcome or "",
                          config_json=json.dumps(run.config), requested_by=run.requested_by or "",
                          promoted_policy_version=run.promoted_policy_version or "",
                          promoted_reward_version=run.promoted_reward_version or "")


def _model_call(context: grpc.ServicerContext, call):
    """Runs a registry move, turning its errors into gRPC statuses."""
    from mlflow.exceptions import MlflowException

    try:
        return call()
    except BadRequest as exc:
        context.set_trailing_metadata(((PARAM_METADATA_KEY, exc.param),))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except Refused as exc:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    except ModelNotRegistered as exc:
        context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            context.abort(grpc.StatusCode.NOT_FOUND, exc.message)
        context.abort(grpc.StatusCode.UNAVAILABLE, f"the model registry: {exc.message}")


class PipelineServicer(pb_grpc.PipelineServiceServicer):
    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.models = ModelOps(runner)

    def StartRun(self, request: pb.StartRunRequest, context: grpc.ServicerContext) -> pb.PipelineRun:
        trigger = request.trigger or "operator"
        if trigger not in TRIGGERS:
            context.set_trailing_metadata(((PARAM_METADATA_KEY, "trigger"),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"trigger must be one of {', '.join(TRIGGERS)}")
        try:
            run = self.runner.start(trigger=trigger, reason=request.reason, config_json=request.config_json,
                                    requested_by=request.requested_by)
        except ConfigError as exc:
            context.set_trailing_metadata(((PARAM_METADATA_KEY, exc.param),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RunInProgress as exc:
            context.set_trailing_metadata(((RUN_ID_METADATA_KEY, exc.run_id),))
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"pipeline run {exc.run_id} is in progress; wait for it "
                                                          "or cancel it")
        return to_proto(run)

    def GetRun(self, request: pb.GetRunRequest, context: grpc.ServicerContext) -> pb.PipelineRun:
        run = self.runner.store.get(request.run_id)
        if run is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no pipeline run {request.run_id!r}")
        return to_proto(run)

    def ListRuns(self, request: pb.ListRunsRequest, context: grpc.ServicerContext) -> pb.ListRunsResponse:
        limit = request.limit or 20
        if not 1 <= limit <= 200:
            context.set_trailing_metadata(((PARAM_METADATA_KEY, "limit"),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit must be from 1 to 200")
        return pb.ListRunsResponse(runs=[to_proto(r) for r in self.runner.store.list(limit)])

    def CancelRun(self, request: pb.CancelRunRequest, context: grpc.ServicerContext) -> pb.PipelineRun:
        try:
            return to_proto(self.runner.cancel(request.run_id))
        except LookupError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no pipeline run {request.run_id!r}")
        except NotCancellable as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    def Health(self, request: pb.PipelineHealthRequest, context: grpc.ServicerContext) -> pb.PipelineHealthResponse:
        active = self.runner.store.active()
        return pb.PipelineHealthResponse(ready=True, active_run_id=active.run_id if active else "",
                                         next_scheduled_in_s=self.runner.next_scheduled_in())

    def ListModelVersions(self, request: pb.ListModelVersionsRequest,
                          context: grpc.ServicerContext) -> pb.ListModelVersionsResponse:
        return _model_call(context, lambda: self.models.list(request.model, request.limit))

    def SetCanary(self, request: pb.SetCanaryRequest, context: grpc.ServicerContext) -> pb.ModelAliases:
        return _model_call(context, lambda: self.models.set_canary(request.version, request.percent, request.reason,
                                                                   request.requested_by))

    def ClearCanary(self, request: pb.ClearCanaryRequest, context: grpc.ServicerContext) -> pb.ModelAliases:
        return _model_call(context, self.models.clear_canary)

    def PromoteModel(self, request: pb.PromoteModelRequest, context: grpc.ServicerContext) -> pb.ModelAliases:
        return _model_call(context, lambda: self.models.promote(request.model, request.version, request.reason,
                                                                request.requested_by))

    def RollbackModel(self, request: pb.RollbackModelRequest, context: grpc.ServicerContext) -> pb.ModelAliases:
        return _model_call(context, lambda: self.models.rollback(request.model))
