"""The gateway's cost per streamed token event, next to what it replaced, in the same process.

  render   one content delta as SSE bytes: services.gateway.streaming.ChunkRenderer.content (a per-stream
           template) vs building and serialising the protocol models (ChatCompletionChunk → ChunkChoice →
           DeltaMessage) as the gateway did before
  send     one event through the ASGI response into a no-op `send`: Starlette's StreamingResponse (what the
           gateway uses) vs sse-starlette's EventSourceResponse (what it used; its per-send timeout scope),
           when sse-starlette is installed (vLLM's `mcp` dependency brings it)

Each pair runs interleaved, --repeats times, and the best of each is kept (the least disturbed by this shared
machine). The last stdout line is a JSON object.

    .venv/bin/python benchmarks/sse_events.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.gateway.protocol import ChatCompletionChunk, ChunkChoice, DeltaMessage  # noqa: E402
from services.gateway.streaming import ChunkRenderer, sse  # noqa: E402

HEADER = {"id": "chatcmpl-0123456789abcdef", "created": 1_700_000_000, "model": "alignloop-policy",
          "system_fingerprint": "alignloop-policy/v3"}
COMPLETION_ID = "cmpl-0123456789abcdef"
TOKEN = " hello"


def per_call_us(fn: Callable[[], object], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n * 1e6


def render_pair(n: int) -> tuple[float, float]:
    """(template µs, models µs) for one content delta."""
    renderer = ChunkRenderer(HEADER["id"], HEADER["created"], HEADER["model"], HEADER["system_fingerprint"],
                             [COMPLETION_ID])

    def by_models() -> bytes:
        return sse(ChatCompletionChunk(choices=[ChunkChoice(index=0, delta=DeltaMessage(content=TOKEN),
                                                            completion_id=COMPLETION_ID)],
                                       **HEADER).model_dump_json(exclude_none=True))

    assert renderer.content(0, TOKEN) == by_models()  # the same bytes, or the comparison means nothing
    return per_call_us(lambda: renderer.content(0, TOKEN), n), per_call_us(by_models, n)


async def send_us(make_response: Callable, n: int) -> float:
    """µs per event of `n` events through the response's ASGI call, into a send that does nothing."""
    event = sse(json.dumps({"choices": [{"delta": {"content": TOKEN}}]}))

    async def events():
        for _ in range(n):
            yield event

    disconnect = asyncio.Event()

    async def receive():
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(_message):
        return None

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST", "headers": []}
    started = time.perf_counter()
    await make_response(events())(scope, receive, send)
    elapsed = time.perf_counter() - started
    disconnect.set()
    return elapsed / n * 1e6


async def send_pair(n: int) -> tuple[float, float | None]:
    """(StreamingResponse µs, EventSourceResponse µs or None when sse-starlette is not installed)."""
    from starlette.responses import StreamingResponse

    ours = await send_us(lambda it: StreamingResponse(it, media_type="text/event-stream"), n)
    try:
        from sse_starlette import EventSourceResponse
    except ImportError:
        return ours, None
    return ours, await send_us(lambda it: EventSourceResponse(it, ping=15), n)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=20_000, help="events per measurement")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import uvloop  # the gateway's loop (uvicorn picks uvloop when installed)

    best: dict[str, float] = {}

    def keep(name: str, value: float | None) -> None:
        if value is not None:
            best[name] = min(best.get(name, value), value)

    for _ in range(args.repeats):
        template, models = render_pair(args.events)
        keep("render_template_us", template)
        keep("render_models_us", models)
        streaming, sse_starlette = uvloop.run(send_pair(args.events))
        keep("send_streaming_response_us", streaming)
        keep("send_sse_starlette_us", sse_starlette)

    summary = {k: round(v, 3) for k, v in best.items()}
    summary["render_speedup"] = round(best["render_models_us"] / best["render_template_us"], 2)
    if "send_sse_starlette_us" in best:
        summary["send_speedup"] = round(best["send_sse_starlette_us"] / best["send_streaming_response_us"], 2)
    print(f"render a content delta: template {summary['render_template_us']} µs, protocol models "
          f"{summary['render_models_us']} µs ({summary['render_speedup']}×)")
    if "send_speedup" in summary:
        print(f"send an event: StreamingResponse {summary['send_streaming_response_us']} µs, sse-starlette "
              f"{summary['send_sse_starlette_us']} µs ({summary['send_speedup']}×)")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
