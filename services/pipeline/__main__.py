"""`python -m services.pipeline`: the pipeline runner (gRPC PipelineService, the schedule, the run worker)."""

from __future__ import annotations

import logging
import signal
from concurrent import futures

import grpc
from prometheus_client import start_http_server

from alignloop import store
from alignloop.config import Settings
from alignloop.grpc_health import ThreadedHealthService, add_health
from alignloop.grpc_serving import server_options
from alignloop.v1 import pipeline_pb2 as pb
from alignloop.v1 import pipeline_pb2_grpc as pb_grpc
from services.pipeline.runner import Runner
from services.pipeline.runs import RunStore
from services.pipeline.server import PipelineServicer


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    settings.ensure_dirs()
    store.upgrade(settings.store)  # the run history lives in the store (migration 0002)
    runner = Runner(settings, RunStore(store.connect(settings.store)))
    runner.recover()

    start_http_server(settings.pipeline_metrics_port, addr=settings.host)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=server_options(settings.grpc_max_connection_age_s))
    pb_grpc.add_PipelineServiceServicer_to_server(PipelineServicer(runner), server)
    # Ready is answering, as its own Health call says: a run in progress does not stop it taking calls.
    health = ThreadedHealthService(pb.DESCRIPTOR.services_by_name["PipelineService"].full_name, lambda: True)
    add_health(server, health)
    server.add_insecure_port(settings.pipeline_target)
    server.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: (health.stopping(), runner.stop()))
    logging.getLogger("alignloop.pipeline").info("pipeline runner on %s (interval %s s, min new feedback %s)",
                                                 settings.pipeline_target, settings.pipeline_interval_s,
                                                 settings.pipeline_min_new_feedback)
    # The worker runs in this thread; a shutdown cancels the run in progress (its step processes are killed).
    runner.serve()
    server.stop(grace=5).wait()


if __name__ == "__main__":
    main()
