"""What every alignloop gRPC service does the same way: its server, and stopping on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal

import grpc


async def start_server(address: str, add_servicer) -> grpc.aio.Server:
    """A started grpc.aio server on `address`, with `add_servicer(server)` applied first.

    so_reuseport=0: a port that is already taken must fail loudly, not be shared silently with another process.
    """
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    add_servicer(server)
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
