"""What `ALIGNLOOP_DTYPE=auto` buys on this machine: the serving engine in bfloat16 against float32, side by side.

On a CPU without AVX-512 BF16 or AMX, bfloat16 has no arithmetic of its own: every operand is converted, and
the engine runs many times slower than in float32. Where the hardware does have it, bfloat16 halves the bytes
moved and is the faster choice. `auto` (alignloop/config.py: serving_dtype) picks by the hardware; this measures
what that choice is worth here.

Both engines are built with the policy service's build_engine, settings alike but the dtype, and take turns
(alternating rounds, so a slow spell of the machine falls on both):

  burst   --concurrency greedy requests of --max-tokens tokens at once: tokens/s
  solo    --solo requests one at a time: time to first token

It prints both engines' figures and the ratios (float32 over bfloat16), and which dtype `auto` chose; the last
stdout line is a JSON object.

    .venv/bin/python benchmarks/serving_dtype.py                # SmolLM2-135M
    .venv/bin/python benchmarks/serving_dtype.py --model tiny   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.table import Table  # noqa: E402

from alignloop.config import serving_dtype  # noqa: E402
from benchmarks.priorities import alternating, build, err, setup, shutdown  # noqa: E402
from benchmarks.serving import percentile  # noqa: E402

DTYPES = ("bfloat16", "float32")


async def one(engine, prompt_ids: list[int], max_tokens: int, request_id: str) -> tuple[int, float]:
    """(tokens, seconds to the first token) of one greedy, fixed-length request."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from services.policy.engine import engine_input

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    start, ttft, tokens = time.perf_counter(), None, 0
    async for out in engine.generate(engine_input(engine, prompt_ids), params, request_id):
        tokens += len(out.outputs[0].token_ids)
        if ttft is None and tokens:
            ttft = time.perf_counter() - start
    return tokens, ttft


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="burst rounds per dtype, alternating")
    p.add_argument("--solo", type=int, default=10, help="one-at-a-time requests per dtype, alternating")
    p.add_argument("--home", type=Path, default=None,
                   help="ALIGNLOOP_HOME, where vLLM keeps its sockets (default .alignloop)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings, folder, tokenizer = setup(args, tiny_max_model_len=512)

    def prompt(round_no: int, i: int) -> list[int]:
        # Different per request, so that no request finds another's prompt in the prefix cache.
        text = f"Request {round_no}-{i}: describe the number {round_no * 1000 + i} in two sentences."
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer.encode(chat, add_special_tokens=False)

    async def run() -> dict[str, dict]:
        engines = {dtype: build(dtype, settings, folder, dtype=dtype) for dtype in DTYPES}
        try:
            results = {d: {"tokens_per_s": [], "ttft_ms": []} for d in DTYPES}
            for dtype in DTYPES:  # warm-up (compilation, caches), not counted
                await asyncio.gather(*(one(engines[dtype], prompt(-1, i), 8, f"warm-{dtype}-{i}") for i in range(4)))
            for round_no, dtype in alternating(DTYPES, args.rounds):
                with err.status(f"burst {round_no + 1}/{args.rounds}: {dtype}"):
                    start = time.perf_counter()
                    done = await asyncio.gather(*(one(engines[dtype], prompt(round_no, i), args.max_tokens,
                                                      f"{dtype}-{round_no}-{i}") for i in range(args.concurrency)))
                results[dtype]["tokens_per_s"].append(sum(t for t, _ in done) / (time.perf_counter() - start))
            for i, dtype in alternating(DTYPES, args.solo):
                _, ttft = await one(engines[dtype], prompt(args.rounds + i, 0), 8, f"{dtype}-solo-{i}")
                results[dtype]["ttft_ms"].append(ttft * 1000)
            return results
        finally:
            shutdown([engines.pop(dtype) for dtype in list(engines)])

    results = asyncio.run(run())
    summary = {"model": folder.name, "auto_chose": serving_dtype("auto"), "rounds": args.rounds,
               "concurrency": args.concurrency, "max_tokens": args.max_tokens}
    table = Table(title=f"{folder.name}: {args.concurrency} requests × {args.max_tokens} tokens at once, "
                        f"{args.rounds} rounds; {args.solo} one at a time")
    for column in ("dtype", "tokens/s (median round)", "rounds", "TTFT p50 one at a time"):
        table.add_column(column)
    for dtype, r in results.items():
        rate, ttft = statistics.median(r["tokens_per_s"]), percentile(r["ttft_ms"], 50)
        summary[dtype] = {"tokens_per_s": round(rate, 1), "ttft_p50_ms": round(ttft, 1)}
        table.add_row(dtype, f"{rate:.1f}", " / ".join(f"{x:.0f}" for x in r["tokens_per_s"]), f"{ttft:.1f} ms")
    err.print(table)
    summary["float32_tokens_per_s_ratio"] = round(summary["float32"]["tokens_per_s"]
                                                  / summary["bfloat16"]["tokens_per_s"], 2)
    summary["float32_ttft_ratio"] = round(summary["float32"]["ttft_p50_ms"] / summary["bfloat16"]["ttft_p50_ms"], 2)
    err.print(f"float32 / bfloat16: {summary['float32_tokens_per_s_ratio']}× the tokens/s, "
              f"{summary['float32_ttft_ratio']}× the time to first token; auto chose {summary['auto_chose']}")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
