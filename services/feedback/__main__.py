"""`python -m services.feedback collector` (gRPC Submit → Kafka) or `... materializer` (Kafka → store)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

from alignloop import store
from alignloop.config import Settings

log = logging.getLogger("alignloop.feedback")


def _store_engine(settings: Settings):
    engine = store.connect(settings.store)
    current, head = store.current_revision(engine), store.head_revision()
    if current != head:
        raise SystemExit(f"the feedback store {engine.url!r} is at revision {current}, not {head}: "
                         "run `alignloop store upgrade`")
    return engine


async def serve_collector(settings: Settings) -> None:
    from alignloop.grpc_health import HealthService
    from alignloop.grpc_serving import start_server, stop_on_signals
    from alignloop.v1 import feedback_pb2_grpc as pb_grpc
    from alignloop import tracing
    from services.feedback.collector import SERVICE_NAME, FeedbackServicer
    from services.feedback.producer import FeedbackProducer

    engine = _store_engine(settings)
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store")
    producer = await asyncio.to_thread(FeedbackProducer, settings.kafka_bootstrap)
    servicer = FeedbackServicer(engine, executor, producer,
                                completion_wait_s=settings.feedback_completion_wait_s,
                                max_ranking=settings.feedback_max_ranking,
                                tracer=tracing.tracer("alignloop-feedback", settings.otlp_traces_endpoint))
    health = HealthService(SERVICE_NAME, servicer.ready)
    server = await start_server(settings.feedback_target,
                                lambda srv: pb_grpc.add_FeedbackServiceServicer_to_server(servicer, srv),
                                health=health, max_connection_age_s=settings.grpc_max_connection_age_s)
    log.info("feedback collector listening on %s; store %s", settings.feedback_target, engine.url)

    stop = stop_on_signals()
    await stop.wait()
    health.stopping()
    log.info("stopping: finishing in-flight submissions (%g s grace)", settings.drain_s)
    await server.stop(grace=settings.drain_s)
    await asyncio.to_thread(producer.close)
    executor.shutdown()
    engine.dispose()


def run_materializer(settings: Settings) -> None:
    from prometheus_client import start_http_server

    from alignloop.store.retention import Policy
    from services.feedback.materializer import Materializer, build_consumer

    engine = _store_engine(settings)
    start_http_server(settings.materializer_port, addr=settings.host)
    consumer = build_consumer(settings.kafka_bootstrap, settings.feedback_consumer_group,
                              settings.kafka_session_timeout_ms)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("materializing into %s as consumer group %s; metrics on :%d; retention %s", engine.url,
             settings.feedback_consumer_group, settings.materializer_port,
             Policy.from_settings(settings))
    try:
        Materializer(consumer, engine, retention=Policy.from_settings(settings),
                     prune_interval_s=settings.store_prune_interval_s).run(stop)
    finally:
        consumer.close(autocommit=False)
        engine.dispose()
    log.info("stopped")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.feedback")
    parser.add_argument("role", choices=["collector", "materializer"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = Settings()
    if args.role == "collector":
        import uvloop

        uvloop.run(serve_collector(settings))
    else:
        run_materializer(settings)


if __name__ == "__main__":
    main()
