"""The floor of an HTTP serving path: an OpenAI-style SSE server with no model behind it.

It answers every `POST /v1/chat/completions` at once with the events a streamed chat completion has (role
chunk, `max_tokens` one-character content deltas, finish chunk, usage chunk, `data: [DONE]`), on the stack the
gateway and vLLM's server both run on (Starlette's StreamingResponse on uvicorn with uvloop and httptools, no
access log). `benchmarks/serving.py` measures it as its `http-floor` target with the same clients as the two
servers: its time to first token is what the client and one HTTP hop cost before any serving logic or
engine work, so a server's added TTFT over the raw engine can be read as this floor plus its own share.

    .venv/bin/python benchmarks/sse_floor.py --port 8123
"""

from __future__ import annotations

import argparse
import json

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


def sse(document: dict | str) -> bytes:
    data = document if isinstance(document, str) else json.dumps(document)
    return b"data: " + data.encode() + b"\n\n"


async def chat_completions(request: Request) -> StreamingResponse | JSONResponse:
    body = await request.json()
    if not body.get("stream"):
        return JSONResponse({"error": {"message": "this floor server only streams", "param": "stream"}},
                            status_code=400)
    tokens = int(body.get("max_tokens") or 1)
    head = {"id": "chatcmpl-floor", "object": "chat.completion.chunk", "created": 0, "model": body.get("model")}

    def choice(delta: dict, finish: str | None = None) -> dict:
        return head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    async def events():
        yield sse(choice({"role": "assistant", "content": ""}))
        for _ in range(tokens):
            yield sse(choice({"content": "x"}))
        yield sse(choice({}, "length"))
        yield sse(head | {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": tokens,
                                                   "total_tokens": tokens + 1}})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


async def health(_: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                        Route("/health", health)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
