"""What conversation affinity saves: multi-turn conversations over --replicas policy replicas, through the
gateway's policy channel as it is by default (round robin) and with `ALIGNLOOP_POLICY_ROUTING=conversation`
(consistent hashing on the conversation, so that each turn reaches the replica whose prefix cache holds the
conversation's earlier turns).

The replicas run here: the policy service's own servicer (services/policy/server.py) on an engine built with
its build_engine, each on a real gRPC server with its health service. The calls go through the gateway's own
channel (alignloop/grpc_channels.py) with the affinity header the gateway sets
(services/gateway/routing.conversation_key). The two routings take turns, round by round, each with
conversations nobody has seen before.

  a round   --conversations conversations, --concurrency at a time, each --turns turns long: a system prompt
            of its own (--system-rules rules), then questions of --question-words words, each answered with
            --answer-tokens tokens (greedy, fixed length), the answer kept in the history

It prints, per routing, the share of the later turns' prompt tokens found cached, their TTFT p50/p95, and the
tokens/s of the round, then the ratios; the last stdout line is a JSON object.

    .venv/bin/python benchmarks/affinity.py                 # SmolLM2-135M
    .venv/bin/python benchmarks/affinity.py --model tiny    # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from alignloop.config import POLICY_MODEL_NAME, Settings  # noqa: E402
from benchmarks.priorities import alternating, setup, shutdown  # noqa: E402
from benchmarks.serving import free_port, percentile  # noqa: E402

ROUTINGS = ("round_robin", "conversation")
TENANT = "benchmark"
err = Console(stderr=True)


def build_engines(settings: Settings, folder: Path, count: int) -> list:
    """The replicas' engines. (Built apart from the servers: something in vLLM's start-up keeps the calling
    frame alive, and an engine held there would outlive its shutdown until the interpreter exits.)"""
    from services.policy.engine import build_engine

    engines = []
    for i in range(count):
        with err.status(f"replica {i}: building the vLLM engine"):
            engines.append(build_engine(settings, folder, served_name=POLICY_MODEL_NAME))
    return engines


async def serve(engines: list, tokenizer) -> tuple[list, list, str]:
    """A policy service on a real gRPC server for each engine; the servers, their servicers, and one target
    naming them all (as a headless Service's name resolves to every ready replica)."""
    from alignloop.grpc_health import HealthService
    from alignloop.grpc_serving import start_server
    from alignloop.v1 import policy_pb2 as pb
    from alignloop.v1 import policy_pb2_grpc as pb_grpc
    from services.policy.server import SERVICE_NAME, PolicyServicer

    servers, servicers, ports = [], [], []
    for engine in engines:
        servicer = PolicyServicer("champion")
        servicers.append(servicer)
        servicer.attach(engine, tokenizer, pb.ModelRef(name=POLICY_MODEL_NAME, version="1"),
                        engine.model_config.max_model_len)
        port = free_port()
        servers.append(await start_server(
            f"127.0.0.1:{port}", lambda srv, s=servicer: pb_grpc.add_PolicyServiceServicer_to_server(s, srv),
            health=HealthService(SERVICE_NAME, servicer.ready, servicer.alive)))
        ports.append(port)
    return servers, servicers, "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)


class Conversation:
    """One conversation's history, and what each of its turns measured."""

    def __init__(self, round_no: int, c: int, args: argparse.Namespace) -> None:
        rules = " ".join(f"Rule {i}: answer in plain words and keep to the point." for i in range(args.system_rules))
        # New first words: no replica has seen this conversation's prompt before.
        self.messages = [("system", f"Conversation {uuid.uuid4().hex}. {rules}")]
        self.name = f"r{round_no}c{c}"
        self.args = args
        self.turns: list[dict] = []

    def question(self, turn: int) -> str:
        return f"Question {turn}: " + " ".join(f"word{(turn * 7 + i) % 50}" for i in range(self.args.question_words))


async def run_turn(policy, conversation: Conversation, turn: int, affinity: bool) -> None:
    """One turn as the gateway sends it: a GenerateStream call, with the conversation's affinity header when
    the channel places calls by it."""
    from alignloop.grpc_channels import AFFINITY_HEADER
    from alignloop.v1 import policy_pb2 as pb
    from services.gateway.routing import conversation_key

    conversation.messages.append(("user", conversation.question(turn)))
    args = conversation.args
    request = pb.GenerateRequest(
        request_id=f"{conversation.name}t{turn}-{uuid.uuid4().hex[:8]}",
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=t) for r, t in conversation.messages]),
        sampling=pb.SamplingParams(temperature=0, max_tokens=args.answer_tokens, ignore_eos=True))
    metadata = ((AFFINITY_HEADER, conversation_key(TENANT, None, conversation.messages)),) if affinity else None
    start, ttft, prompt_tokens, cached_tokens, tokens, text = time.perf_counter(), None, 0, 0, 0, []
    async for message in policy.GenerateStream(request, timeout=600, metadata=metadata):
        prompt_tokens = message.prompt_tokens or prompt_tokens
        cached_tokens = message.cached_tokens or cached_tokens
        for delta in message.deltas:
            if ttft is None and delta.token_ids:
                ttft = time.perf_counter() - start
            tokens += len(delta.token_ids)
            text.append(delta.text)
    conversation.messages.append(("assistant", "".join(text)))
    conversation.turns.append({"ttft": ttft, "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens,
                               "tokens": tokens})


async def run_round(target: str, routing: str, round_no: int, args: argparse.Namespace) -> dict:
    """Every conversation of one round, --concurrency at a time, through a channel of this routing."""
    from alignloop.grpc_channels import retrying_channel
    from alignloop.v1 import policy_pb2_grpc as pb_grpc

    affinity = routing == "conversation"
    conversations = [Conversation(round_no, c, args) for c in range(args.conversations)]
    pending = list(conversations)
    async with retrying_channel(target, health_checked=True, affinity=affinity) as channel:
        policy = pb_grpc.PolicyServiceStub(channel)

        async def worker() -> None:
            while pending:
                conversation = pending.pop()
                for turn in range(args.turns):
                    await run_turn(policy, conversation, turn, affinity)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
    later = [t for c in conversations for t in c.turns[1:]]
    return {"ttft": [t["ttft"] for t in later],
            "prompt_tokens": sum(t["prompt_tokens"] for t in later),
            "cached_tokens": sum(t["cached_tokens"] for t in later),
            "first_turn_cached_tokens": sum(c.turns[0]["cached_tokens"] for c in conversations),
            "tokens_per_s": sum(t["tokens"] for c in conversations for t in c.turns) / elapsed}


def report(results: dict[str, dict], args: argparse.Namespace) -> dict:
    table = Table(title=f"{args.conversations} conversations of {args.turns} turns, {args.concurrency} at a time, "
                        f"over {args.replicas} policy replicas ({args.rounds} rounds each)")
    for column in ("routing", "later turns' prompt cached", "TTFT p50", "TTFT p95", "tokens/s"):
        table.add_column(column, justify="left" if column == "routing" else "right")
    summary: dict = {"model": args.model, "replicas": args.replicas, "conversations": args.conversations,
                     "turns": args.turns, "concurrency": args.concurrency, "rounds": args.rounds}
    for routing, r in results.items():
        row = {"cached_share": r["cached_tokens"] / r["prompt_tokens"],
               "ttft_p50_ms": 1000 * percentile(r["ttft"], 50), "ttft_p95_ms": 1000 * percentile(r["ttft"], 95),
               "tokens_per_s": statistics.mean(r["tokens_per_s"]),
               "first_turn_cached_tokens": r["first_turn_cached_tokens"]}
        summary[routing] = row
        table.add_row(routing, f"{row['cached_share']:.1%}", f"{row['ttft_p50_ms']:,.0f} ms",
                      f"{row['ttft_p95_ms']:,.0f} ms", f"{row['tokens_per_s']:,.1f}")
    rr, aff = summary["round_robin"], summary["conversation"]
    summary["ttft_p50_ratio_round_robin_over_conversation"] = rr["ttft_p50_ms"] / aff["ttft_p50_ms"]
    summary["throughput_ratio_conversation_over_round_robin"] = aff["tokens_per_s"] / rr["tokens_per_s"]
    err.print(table)
    err.print(f"later turns' TTFT p50: {summary['ttft_p50_ratio_round_robin_over_conversation']:.2f}× shorter with "
              f"conversation affinity; throughput {summary['throughput_ratio_conversation_over_round_robin']:.2f}× "
              "of round robin's")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--conversations", type=int, default=12, help="conversations a round")
    p.add_argument("--concurrency", type=int, default=6, help="conversations under way at once")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-rules", type=int, default=30, help="the system prompt's length, in rules of ~15 tokens")
    p.add_argument("--question-words", type=int, default=60, help="a question's length (~3 tokens a word)")
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="rounds per routing, alternating")
    p.add_argument("--home", type=Path, default=None,
                   help="ALIGNLOOP_HOME, where vLLM keeps its sockets (default .alignloop)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings, folder, tokenizer = setup(args, tiny_max_model_len=1024)

    async def run() -> dict[str, dict]:
        engines = build_engines(settings, folder, args.replicas)
        servers, servicers = [], []
        try:
            servers, servicers, target = await serve(engines, tokenizer)
            results = {r: {"ttft": [], "prompt_tokens": 0, "cached_tokens": 0, "first_turn_cached_tokens": 0,
                           "tokens_per_s": []} for r in ROUTINGS}
            for routing in ROUTINGS:  # warm-up (compilation, first connections), not counted
                await run_round(target, routing, -1, args)
            for round_no, routing in alternating(ROUTINGS, args.rounds):
                with err.status(f"round {round_no + 1}/{args.rounds}: {routing}"):
                    r = await run_round(target, routing, round_no, args)
                results[routing]["ttft"] += r["ttft"]
                results[routing]["tokens_per_s"].append(r["tokens_per_s"])
                for key in ("prompt_tokens", "cached_tokens", "first_turn_cached_tokens"):
                    results[routing][key] += r[key]
            return results
        finally:
            await asyncio.gather(*(server.stop(None) for server in servers))
            for servicer in servicers:  # the stopped servers still hold their servicers
                servicer.engine = None
            shutdown(engines)

    summary = report(asyncio.run(run()), args)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
