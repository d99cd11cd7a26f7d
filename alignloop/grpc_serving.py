"""What every alignloop gRPC service does the same way: its server, and stopping on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal

import grpc

from alignloop.grpc_health import HealthService, add_health


def server_options(max_connection_age_s: float = 0.0) -> list[tuple[str, int]]:
    """Options every alignloop gRPC server takes.

    so_reuseport=0: a port that is already taken must fail loudly, not be shared silently with another process.
    max_connection_age: after this long (jittered by ±10%) the server asks the client to move to a new
    connection (GOAWAY). The client then resolves the service name again, which is how a scaled-out replica
    starts getting calls from the clients that were already connected. Calls in flight on the old connection
    finish there, however long they run (the grace stays gRPC's default: unlimited). 0: never.
    """
    options = [("grpc.so_reuseport", 0)]
    if max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)))
    return options


async def start_server(address: str, add_servicer, *, health: HealthService | None = None,
                       max_connection_age_s: float = 0.0) -> grpc.aio.Server:
    """A started grpc.aio server on `address`, with `add_servicer(server)` applied first and `health` served as
    grpc.health.v1 (see `server_options`)."""
    server = grpc.aio.server(options=server_options(max_connection_age_s))
    add_servicer(server)
    if health is not None:
        add_health(server, health)
    server.add_insecure_port(address)
    await server.start()
    return server


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (the supervisor stops a component with SIGTERM)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
