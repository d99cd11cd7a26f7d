"""What the gateway's hop to the policy service costs per token, and what batching the streams would save.

The policy service answers each chat request on its own gRPC stream (GenerateStream), one message per engine
step, so with C requests in flight a step costs C messages between the two processes. The other way to carry
the same tokens is one stream for all of them, with one message per step holding every request's delta, as
vLLM's engine core sends its outputs to its front end. This script measures the CPU both ways cost, in a
server process (the policy service's side) and its client (the gateway's side), with the real
GenerateStreamResponse messages, uvloop on both sides, and a step clock in the server that wakes every stream
at once, as one engine step does:

  per-request  C streams, one message of one delta per step on each (what alignloop does)
  batched      one stream, one message of C deltas per step, which the client hands to C coroutines (one per
               request, as a gateway's HTTP streams would read them)

Only the messaging differs: the step clock, the deltas and the tokens are the same. The two run in turn,
--repeats times; the median of each is reported. The last stdout line is a JSON object.

    .venv/bin/python benchmarks/grpc_streams.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import psutil  # noqa: E402
import uvloop  # noqa: E402

from alignloop.supervisor import free_ports  # noqa: E402
from alignloop.v1 import policy_pb2 as pb  # noqa: E402
from alignloop.v1 import policy_pb2_grpc as pb_grpc  # noqa: E402

MODES = ("per-request", "batched")


def delta(index: int) -> pb.Completion:
    """One token's delta, as the policy service streams it (no logprobs)."""
    return pb.Completion(index=index, text=" hello", token_ids=[22557])


class StepClock:
    """Wakes every waiting stream at once, every `step_s`: one engine step."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self._next: asyncio.Future | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._next = loop.create_future()
        while True:
            await asyncio.sleep(self.step_s)
            done, self._next = self._next, loop.create_future()
            done.set_result(None)

    async def step(self) -> None:
        await asyncio.shield(self._next)


class Streams(pb_grpc.PolicyServiceServicer):
    """GenerateStream, told by the request what to send: request_id is the mode, max_tokens the steps and n
    the deltas per message."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    async def GenerateStream(self, request: pb.GenerateRequest, context):
        steps = request.sampling.max_tokens
        if request.request_id != "batched":
            message = pb.GenerateStreamResponse(deltas=[delta(0)])
            for _ in range(steps):
                await self.clock.step()
                yield message
            return
        # Batched: each request still has its own coroutine, woken by the step (as AsyncLLM's generate() is);
        # they leave their deltas in one outbox, which goes out as one message once they all ran.
        outbox: list[pb.Completion] = []

        async def request_(index: int) -> None:
            for _ in range(steps):
                await self.clock.step()
                outbox.append(delta(index))

        requests = [asyncio.ensure_future(request_(i)) for i in range(request.sampling.n)]
        try:
            sent = 0
            while sent < steps * len(requests):
                await self.clock.step()
                await asyncio.sleep(0)  # after the requests' coroutines, which this step woke too
                message, outbox[:] = pb.GenerateStreamResponse(deltas=outbox), []
                sent += len(message.deltas)
                yield message
        finally:
            for task in requests:
                task.cancel()


def serve(port: int, step_s: float, ready) -> None:
    async def main() -> None:
        clock = StepClock(step_s)
        server = grpc.aio.server()
        pb_grpc.add_PolicyServiceServicer_to_server(Streams(clock), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ticking = asyncio.ensure_future(clock.run())
        ready.set()
        try:
            await server.wait_for_termination()
        finally:
            ticking.cancel()

    uvloop.run(main())


async def drive(port: int, mode: str, concurrency: int, steps: int) -> int:
    """Tokens received: `concurrency` requests for `steps` steps, carried as `mode` says."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.PolicyServiceStub(channel)

        async def stream() -> int:
            call = stub.GenerateStream(pb.GenerateRequest(
                request_id=mode, sampling=pb.SamplingParams(n=1, max_tokens=steps)))
            tokens = 0
            while (message := await call.read()) is not grpc.aio.EOF:
                tokens += len(message.deltas)
            return tokens

        if mode == "per-request":
            return sum(await asyncio.gather(*(stream() for _ in range(concurrency))))
        # Batched: as a gateway would, hand each delta to the coroutine of its own request (its HTTP stream).
        inboxes: list[asyncio.Queue] = [asyncio.Queue() for _ in range(concurrency)]

        async def request(inbox: asyncio.Queue) -> int:
            tokens = 0
            while await inbox.get() is not None:
                tokens += 1
            return tokens

        requests = [asyncio.ensure_future(request(inbox)) for inbox in inboxes]
        call = stub.GenerateStream(pb.GenerateRequest(
            request_id=mode, sampling=pb.SamplingParams(n=concurrency, max_tokens=steps)))
        while (message := await call.read()) is not grpc.aio.EOF:
            for d in message.deltas:
                inboxes[d.index].put_nowait(d)
        for inbox in inboxes:
            inbox.put_nowait(None)
        return sum(await asyncio.gather(*requests))


def cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def measure(args: argparse.Namespace) -> dict:
    port = free_ports(1)[0]
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Event()
    server = spawn.Process(target=serve, args=(port, args.step_ms / 1000, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the stream server did not start")
        server_proc, client_proc = psutil.Process(server.pid), psutil.Process()
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}  # (server, client) µs per token
        uvloop.run(drive(port, "batched", args.concurrency, 20))  # warm-up: connection, first calls
        for repeat in range(args.repeats):
            for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                server_before, client_before = cpu_s(server_proc), cpu_s(client_proc)
                started = time.perf_counter()
                tokens = uvloop.run(drive(port, mode, args.concurrency, args.steps))
                wall = time.perf_counter() - started
                if tokens != args.concurrency * args.steps:
                    raise RuntimeError(f"{mode}: {tokens} tokens, expected {args.concurrency * args.steps}")
                runs[mode].append(((cpu_s(server_proc) - server_before) * 1e6 / tokens,
                                   (cpu_s(client_proc) - client_before) * 1e6 / tokens))
                server_us, client_us = runs[mode][-1]
                print(f"  {mode:12s} {tokens / wall:8.0f} tokens/s  server {server_us:6.1f} µs/token  "
                      f"client {client_us:6.1f} µs/token", file=sys.stderr)
    finally:
        server.terminate()
        server.join(10)
    result: dict = {"concurrency": args.concurrency, "steps": args.steps, "step_ms": args.step_ms,
                    "repeats": args.repeats}
    for mode in MODES:
        key = mode.replace("-", "_")
        result[f"{key}_server_us_per_token"] = round(statistics.median(s for s, _ in runs[mode]), 2)
        result[f"{key}_client_us_per_token"] = round(statistics.median(c for _, c in runs[mode]), 2)
    for side in ("server", "client"):
        batched = result[f"batched_{side}_us_per_token"]
        # None: a run too short for the CPU clock's ticks (10 ms) to see the batched side at all.
        result[f"{side}_ratio_per_request_vs_batched"] = (
            round(result[f"per_request_{side}_us_per_token"] / batched, 2) if batched else None)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=16,
                   help="requests in flight (the serving benchmark's 16)")
    p.add_argument("--steps", type=int, default=1000, help="engine steps per run: tokens per request")
    p.add_argument("--step-ms", type=float, default=4.0, help="one engine step's time")
    p.add_argument("--repeats", type=int, default=4, help="runs of each mode, taken in turn")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = measure(args)
    print(f"per token, {args.concurrency} requests in flight: per-request streams cost the server (policy) "
          f"{result['per_request_server_us_per_token']} µs and the client (gateway) "
          f"{result['per_request_client_us_per_token']} µs; batched, {result['batched_server_us_per_token']} "
          f"and {result['batched_client_us_per_token']} µs")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
