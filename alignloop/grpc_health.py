"""grpc.health.v1 (proto/alignloop/v1/health.proto) for alignloop's gRPC services.

Each service publishes three names:
- "" and its own full name (e.g. "alignloop.v1.PolicyService"): ready to take calls. Kubernetes' readiness
  probe and the clients' health checking (alignloop/grpc_channels.py) ask this. It turns NOT_SERVING as soon
  as the service starts to stop, so that clients move their calls to other replicas before the drain.
- "liveness": the process works and should not be restarted. It stays SERVING while the service waits for a
  dependency (Kafka, a model version), which a restart would not bring; it fails when what failed is inside
  the process (a dead vLLM engine), or when the event loop no longer answers.

A status is computed when it is asked for, from the service's own check. `Watch` asks again every
`watch_interval_s` and sends only changes; its watchers (one per client connection) share one answer per
interval, so a check that asks Kafka or a database runs about once a second however many clients watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping

import grpc

from alignloop.v1 import health_pb2 as pb
from alignloop.v1 import health_pb2_grpc as pb_grpc

log = logging.getLogger("alignloop.health")

LIVENESS = "liveness"
SERVING = pb.HealthCheckResponse.SERVING
NOT_SERVING = pb.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = pb.HealthCheckResponse.SERVICE_UNKNOWN


async def _always() -> bool:
    return True


class _Published(pb_grpc.HealthServicer):
    """The names a service publishes, their checks, and the statuses that need no check."""

    def __init__(self, service_name: str, ready, alive, stopping: asyncio.Event | threading.Event,
                 watch_interval_s: float) -> None:
        self._checks: Mapping[str, Callable] = {"": ready, service_name: ready, LIVENESS: alive}
        self._stopping = stopping
        self.watch_interval_s = watch_interval_s

    def stopping(self) -> None:
        """The service is about to drain: it is no longer ready (liveness is unchanged), and watchers hear so
        at once."""
        self._stopping.set()

    def _settled(self, service: str) -> int | None:
        """A status no check can change (an unknown name; not ready while stopping), or None."""
        if service not in self._checks:
            return SERVICE_UNKNOWN
        if self._stopping.is_set() and service != LIVENESS:
            return NOT_SERVING
        return None

    @staticmethod
    def _failed(service: str) -> int:
        log.warning("health check of %r failed", service, exc_info=True)
        return NOT_SERVING  # a check that fails says: not serving


class HealthService(_Published):
    """The health service of an asyncio gRPC server."""

    def __init__(self, service_name: str, ready: Callable[[], Awaitable[bool]],
                 alive: Callable[[], Awaitable[bool]] = _always, *, watch_interval_s: float = 1.0) -> None:
        super().__init__(service_name, ready, alive, asyncio.Event(), watch_interval_s)
        self._recent: dict[str, tuple[float, int]] = {}  # service -> (when, status) of its last check
        self.watchers = 0  # open Watch streams

    async def status(self, service: str, max_age_s: float = 0.0) -> int:
        """`service`'s status; one computed less than `max_age_s` ago is reused."""
        if (settled := self._settled(service)) is not None:
            return settled
        now = time.monotonic()
        if (recent := self._recent.get(service)) and now - recent[0] < max_age_s:
            return recent[1]
        try:
            status = SERVING if await self._checks[service]() else NOT_SERVING
        except Exception:
            status = self._failed(service)
        self._recent[service] = (now, status)
        return status

    async def Check(self, request: pb.HealthCheckRequest, context) -> pb.HealthCheckResponse:
        status = await self.status(request.service)
        if status == SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return pb.HealthCheckResponse(status=status)

    async def Watch(self, request: pb.HealthCheckRequest, context):
        self.watchers += 1
        try:
            last = None
            while True:
                # Read before the status: a stop that comes while the last status is being sent must be
                # sent too, not slept through.
                stopped = self._stopping.is_set()
                status = await self.status(request.service, max_age_s=0.9 * self.watch_interval_s)
                if status != last:
                    yield pb.HealthCheckResponse(status=status)
                    last = status
                if stopped:  # nothing will change any more: just keep the stream open
                    await asyncio.sleep(self.watch_interval_s)
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.watch_interval_s):
                        await self._stopping.wait()
        finally:
            self.watchers -= 1


class ThreadedHealthService(_Published):
    """The health service of a thread-pool gRPC server (the pipeline runner's); a Watch holds one of its
    threads, so nothing in alignloop watches it: Kubernetes' probes call Check."""

    def __init__(self, service_name: str, ready: Callable[[], bool], *, watch_interval_s: float = 1.0) -> None:
        super().__init__(service_name, ready, lambda: True, threading.Event(), watch_interval_s)

    def status(self, service: str) -> int:
        if (settled := self._settled(service)) is not None:
            return settled
        try:
            return SERVING if self._checks[service]() else NOT_SERVING
        except Exception:
            return self._failed(service)

    def Check(self, request: pb.HealthCheckRequest, context: grpc.ServicerContext) -> pb.HealthCheckResponse:
        status = self.status(request.service)
        if status == SERVICE_UNKNOWN:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return pb.HealthCheckResponse(status=status)

    def Watch(self, request: pb.HealthCheckRequest, context: grpc.ServicerContext):
        last = None
        while context.is_active():
            stopped = self._stopping.is_set()  # before the status, as in HealthService.Watch
            status = self.status(request.service)
            if status != last:
                yield pb.HealthCheckResponse(status=status)
                last = status
            if stopped:  # nothing will change any more (and wait() would return at once)
                time.sleep(self.watch_interval_s)
            else:
                self._stopping.wait(self.watch_interval_s)


def add_health(server, health: HealthService | ThreadedHealthService) -> None:
    pb_grpc.add_HealthServicer_to_server(health, server)


def check(target: str, service: str = "", timeout: float = 2.0) -> int | None:
    """The status `target` reports for `service` (blocking); None when it does not answer or does not know it."""
    with grpc.insecure_channel(target) as channel:
        try:
            return pb_grpc.HealthStub(channel).Check(pb.HealthCheckRequest(service=service), timeout=timeout).status
        except grpc.RpcError:
            return None
