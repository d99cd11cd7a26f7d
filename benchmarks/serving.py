"""Serving benchmark: alignloop's gateway vs vLLM's own OpenAI server vs the raw vLLM engine.

Same model, same engine settings (services/policy/engine.py: build_engine), same prompts, greedy decoding with
ignore_eos (every request generates exactly --max-tokens), the same number of concurrent streaming clients.
All targets are up at once, each with its own engine, and are measured side by side: each round runs on one
target after the other while the rest stay idle (the machine is first let go quiet), so a slow spell of this
shared machine falls on every target rather than on whichever happened to run then:

  alignloop    `alignloop up` (broker, MLflow, policy service, gateway); streaming over the gateway's SSE
  policy-grpc  the same stack's policy service called directly (GenerateStream), as the gateway calls it: the
               difference to alignloop is the gateway's share of the path, the difference to raw the policy
               service's
  vllm-server  `python -m vllm.entrypoints.openai.api_server` with the same engine flags; same client code
  raw          vLLM AsyncLLM in this process, `engine.generate` with RequestOutputKind.DELTA
  http-floor   benchmarks/sse_floor.py: an SSE server with no model that answers at once, same client code;
               its TTFT is what the HTTP client and one HTTP hop cost by themselves, the part of any
               HTTP server's added TTFT over the raw engine that no server can remove

Per target: a warm-up round, then --rounds measured rounds of --concurrency requests each. Throughput is the
completion tokens the target reports (usage / token ids) over the rounds' wall time; TTFT is the time from
sending a request to its first non-empty content delta. Under 16 simultaneous requests, TTFT is mostly queueing
for the engine's first batches; so --solo requests are then sent one at a time, whose TTFT is the latency the
serving path itself adds.

    .venv/bin/python benchmarks/serving.py            # SmolLM2-135M, 16 clients, 64 tokens, 5 rounds
    .venv/bin/python benchmarks/serving.py --model tiny --rounds 1 --max-tokens 16    # quick check

The last line on stdout is a JSON object with the figures; everything else about progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table
from scipy import stats

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script: make `alignloop` and `services` importable

from alignloop.components import http_ok  # noqa: E402
from alignloop.config import POLICY_MODEL_NAME, Settings, serving_dtype, vllm_serving_environment  # noqa: E402
from alignloop.supervisor import free_ports, read_state, stop_groups, with_parent_death_signal  # noqa: E402

TARGETS = ("alignloop", "policy-grpc", "vllm-server", "raw", "http-floor")
# Targets of the brief: alignloop serves at least as fast as vLLM's server and adds at most 5 ms of TTFT.
MIN_THROUGHPUT_RATIO = 1.0
MAX_ADDED_TTFT_MS = 5.0

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain recursion to a ten-year-old.",
    "Give me three tips for sleeping better.",
    "How do I reverse a list in Python?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What is the difference between weather and climate?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot.",
    "List the planets of the solar system in order.",
    "What does HTTP stand for, and what is it used for?",
    "Write a short thank-you note to a teacher.",
    "How many minutes are there in a day? Show the arithmetic.",
    "Describe the taste of a lemon to someone who never had one.",
    "What are the main ingredients of a pancake?",
    "Give an example of a metaphor and explain it.",
    "What is a prime number? Name the first five.",
]

# Progress goes to stderr so that stdout holds only the table and, last, the JSON line.
err = Console(stderr=True)
out = Console(soft_wrap=True)


@dataclass
class Result:
    """What one target did in its measured rounds."""

    target: str
    tokens: int = 0
    wall_s: float = 0.0
    ttft_ms: list[float] = field(default_factory=list)
    requests: int = 0
    solo_ttft_ms: list[float] = field(default_factory=list)
    # CPU seconds each process (or group of processes) of this target used during its measured rounds.
    cpu_s: dict[str, float] = field(default_factory=dict)
    # Tokens/s of each measured round, in round order: rounds of different targets with the same index ran
    # minutes apart at most, which pairs them against the machine's slow spells.
    round_tokens_per_s: list[float] = field(default_factory=list)
    # CPU ms per token that this target's own processes used in each measured round (the "machine" total left
    # out: it counts other tenants' steal too). A slow spell raises it as well (the cores themselves run
    # slower, so the same work costs more CPU time), which is why these are paired by round like tokens/s.
    # None for a round that produced no tokens, so that index i is still round i + 1.
    round_cpu_ms_per_token: list[float | None] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def cpu_ms_per_token(self) -> float | None:
        """CPU ms per token of this target's own processes over all measured rounds; None without data."""
        own = sum(cpu for part, cpu in self.cpu_s.items() if part != "machine")
        return own * 1000 / self.tokens if self.tokens and own else None

    def summary(self) -> dict:
        return {
            "tokens_per_s": round(self.tokens_per_s, 2),
            "ttft_p50_ms": round(percentile(self.ttft_ms, 50), 2),
            "ttft_p95_ms": round(percentile(self.ttft_ms, 95), 2),
            "completion_tokens": self.tokens,
            "wall_s": round(self.wall_s, 3),
            "requests": self.requests,
            "solo_ttft_p50_ms": round(percentile(self.solo_ttft_ms, 50), 2),
            "round_tokens_per_s": [round(v, 2) for v in self.round_tokens_per_s],
            "round_cpu_ms_per_token": [v if v is None else round(v, 3) for v in self.round_cpu_ms_per_token],
            "cpu_ms_per_token": {part: round(cpu * 1000 / self.tokens, 3) for part, cpu in self.cpu_s.items()}
            if self.tokens else {},
        }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks (numpy's default); NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds `proc` has used so far."""
    t = proc.cpu_times()
    return t.user + t.system


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent on anything but idling and waiting for I/O, so far."""
    m = psutil.cpu_times()
    return (m.user + m.nice + m.system + getattr(m, "irq", 0.0) + getattr(m, "softirq", 0.0)
            + getattr(m, "steal", 0.0))


class CpuMeter:
    """CPU seconds used by each part of each target, so that the report can say where a serving path spends
    the machine, not only how fast it is. On two cores every CPU-second a frontend uses is one the engine's
    forward pass does not get.

    A part is a root process and its descendants (one service with the engine processes it spawned), each
    descendant listed on its own ("policy › VLLM::EngineCore"); a root given with `alone` counts only itself
    (the supervisor, whose children are parts of their own). "machine" is every core's busy time, for what the
    listed parts do not explain.
    """

    def __init__(self) -> None:
        self.roots: dict[str, dict[str, tuple[int, bool]]] = {}  # target -> part -> (pid, alone)

    def add(self, target: str, part: str, pid: int, alone: bool = False) -> None:
        self.roots.setdefault(target, {})[part] = (pid, alone)

    def snapshot(self, target: str) -> dict[str, float]:
        others = {pid for t, parts in self.roots.items() for pid, _ in parts.values()} | {os.getpid()}
        seconds: dict[str, float] = {}
        for part, (pid, alone) in self.roots.get(target, {}).items():
            try:
                root = psutil.Process(pid)
                procs = [(part, root)]
                if not alone:
                    procs += [(f"{part} › {process_label(p)}", p) for p in own_descendants(root, others)]
            except psutil.NoSuchProcess:
                continue
            for label, proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    seconds[label] = seconds.get(label, 0.0) + cpu_seconds(proc)
        seconds["machine"] = machine_busy_seconds()
        return seconds


def own_descendants(root: psutil.Process, others: set[int]) -> list[psutil.Process]:
    """`root`'s descendants, leaving out the subtrees of the other roots (other targets started from here)."""
    found, stack = [], list(root.children())
    while stack:
        p = stack.pop()
        if p.pid in others:
            continue
        found.append(p)
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            stack.extend(p.children())
    return found


def process_label(proc: psutil.Process) -> str:
    """A short name for a process: vLLM's process title, a module run with -m, or the program's name."""
    try:
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    if not cmd:
        return proc.name()
    if cmd[0].startswith("VLLM"):
        return cmd[0].split()[0]
    if "-m" in cmd[:-1]:
        return cmd[cmd.index("-m") + 1]
    if "-c" in cmd[:-1]:
        return "python -c"
    return Path(cmd[0]).name


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {part: after[part] - before.get(part, 0.0) for part in after}


def median_difference_ci(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0
                         ) -> tuple[float, float] | None:
    """A 95% bootstrap interval of p50(a) − p50(b), each list resampled on its own. A solo TTFT is mostly one
    forward pass, whose jitter on two shared cores (tens of ms) dwarfs the few ms a serving path adds: the
    interval says whether a difference is measured or noise."""
    if len(a) < 2 or len(b) < 2:
        return None
    rng = random.Random(seed)
    diffs = sorted(percentile(rng.choices(a, k=len(a)), 50) - percentile(rng.choices(b, k=len(b)), 50)
                   for _ in range(resamples))
    return percentile(diffs, 2.5), percentile(diffs, 97.5)


def paired_ratio_ci(a: list[float | None], b: list[float | None], confidence: float = 0.95
                    ) -> tuple[float, float, float] | None:
    """The geometric mean of the per-round ratios a[i] / b[i] and its t-interval: (mean, low, high); None with
    fewer than 2 rounds or when a round has no figure (None, or not positive) on either side. The machine's
    speed drifts by more than the gap between targets, and both sides of a pair ran in the same round, so
    their ratio cancels most of that drift; how much the ratios still spread says whether a throughput ratio
    is measured or noise."""
    if len(a) != len(b) or len(a) < 2 or not all(x is not None and x > 0 for x in a + b):
        return None
    logs = [math.log(x / y) for x, y in zip(a, b)]
    mean = statistics.fmean(logs)
    half = stats.t.ppf((1 + confidence) / 2, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def messages_for(round_no: int, client: int) -> list[dict[str, str]]:
    """The chat of one client in one round; identical for every target.

    The round number leads the system message so that no round reuses another's cached prefix: TTFT then
    includes a real prefill, as it would for new users.
    """
    return [
        {"role": "system", "content": f"Round {round_no}. You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": PROMPTS[client % len(PROMPTS)]},
    ]


# ---- measuring ---------------------------------------------------------------------------------------------
# One request: (round, client) -> (completion tokens, TTFT in seconds or None).
RequestFn = Callable[[int, int], Awaitable[tuple[int, float | None]]]


def turn_order(names: list[str], k: int) -> list[str]:
    """Turn k's order of the targets: the cycle of `names` started at position k (mod len), so that no target
    always goes first, and on odd turns the reverse cycle, so that no target always follows the same one (the
    round before it could leave work behind, or a machine state, that weighs on its round every time)."""
    cycle = names if k % 2 == 0 else names[::-1]
    k %= len(cycle)
    return cycle[k:] + cycle[:k]


def settle(label: str, below_percent: float = 25.0, seconds: int = 2, timeout_s: float = 120.0) -> None:
    """Waits until the machine's CPU use stays under `below_percent` (of all cores) for `seconds` seconds in a
    row. "Ready" comes before everything a target started has gone quiet (alignloop's other services finish
    starting and first poll the registry), and an engine that just served keeps polling for its next batch for
    a second: on two cores either would be charged to whichever target is measured next."""
    started, quiet = time.monotonic(), 0
    while quiet < seconds and time.monotonic() - started < timeout_s:
        quiet = quiet + 1 if psutil.cpu_percent(interval=1.0) < below_percent else 0
    waited = time.monotonic() - started
    if waited > seconds + 3:
        err.print(f"  {label}: machine quiet after {waited:.0f} s")


async def run_round(one_request: RequestFn, round_no: int, concurrency: int) -> tuple[float, list]:
    """`concurrency` simultaneous requests; (wall seconds, [(tokens, ttft)])."""
    started = time.perf_counter()
    done = await asyncio.gather(*(one_request(round_no, c) for c in range(concurrency)))
    return time.perf_counter() - started, done


async def measure(targets: dict[str, RequestFn], args: argparse.Namespace, meter: CpuMeter
                  ) -> dict[str, Result]:
    """Every target is up at once and idle but for its turn. Round by round, each target runs the round in
    turn (the order rotates, so none is always first): a warm-up round (not counted), then --rounds rounds
    of --concurrency simultaneous requests, then --solo requests one at a time, again in turn. Side by side,
    a slow minute of this shared machine costs every target about the same."""
    results = {name: Result(name) for name in targets}
    names = list(targets)
    await asyncio.to_thread(settle, "all targets started")
    for round_no in range(args.rounds + 1):
        label = "warm-up" if round_no == 0 else f"round {round_no}/{args.rounds}"
        line = []
        for name in turn_order(names, round_no):
            await asyncio.to_thread(settle, name)
            cpu_before = meter.snapshot(name)
            wall, done = await run_round(targets[name], round_no, args.concurrency)
            cpu = cpu_delta(cpu_before, meter.snapshot(name))
            tokens = sum(n for n, _ in done)
            line.append(f"{name} {tokens / wall:.0f} tok/s")
            if round_no == 0:
                continue
            r = results[name]
            r.wall_s += wall
            r.requests += len(done)
            r.tokens += tokens
            r.round_tokens_per_s.append(tokens / wall)
            own = sum(seconds for part, seconds in cpu.items() if part != "machine")
            r.round_cpu_ms_per_token.append(own * 1000 / tokens if tokens else None)
            r.ttft_ms += [ttft * 1000 for _, ttft in done if ttft is not None]
            for part, seconds in cpu.items():
                r.cpu_s[part] = r.cpu_s.get(part, 0.0) + seconds
        err.print(f"  {label}: " + ", ".join(line))
    for i in range(args.solo):
        # Rounds past the measured ones: prompts no earlier request has cached.
        for name in turn_order(names, i):
            await asyncio.to_thread(settle, name)
            _, ttft = await targets[name](args.rounds + 1 + i, i)
            if ttft is not None:
                results[name].solo_ttft_ms.append(ttft * 1000)
        if (i + 1) % 10 == 0 and i + 1 < args.solo:  # each waits for a quiet machine: this phase takes minutes
            err.print(f"  one at a time: {i + 1}/{args.solo} requests to each target")
    err.print("  one at a time, TTFT p50: " + ", ".join(
        f"{name} {percentile(r.solo_ttft_ms, 50):.1f} ms" for name, r in results.items()))
    return results


def chat_request(args: argparse.Namespace, round_no: int, client: int) -> dict:
    """The body every HTTP client sends: greedy, streamed with a usage chunk, and vLLM's `ignore_eos` (the
    gateway passes it on too), so every request generates exactly max_tokens whatever the model says."""
    return {"model": POLICY_MODEL_NAME, "messages": messages_for(round_no, client), "max_tokens": args.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


def openai_target(base_url: str, api_key: str, args: argparse.Namespace, stack: contextlib.AsyncExitStack
                  ) -> RequestFn:
    """Streams chat completions through the official OpenAI SDK, as an application would."""
    from openai import AsyncOpenAI

    # No retries: a failed request must fail the benchmark, not be hidden in its timings.
    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
    stack.push_async_callback(client.close)

    async def one_request(round_no: int, c: int) -> tuple[int, float | None]:
        body = chat_request(args, round_no, c)
        sent = time.perf_counter()
        ttft, usage_tokens = None, None
        extra = {"ignore_eos": body.pop("ignore_eos")}  # vLLM's extension: the SDK sends it through extra_body
        stream = await client.chat.completions.create(**body, extra_body=extra)
        async for chunk in stream:
            # Both servers open with a role-only chunk whose content is "": that is not a token yet.
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - sent
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
        if usage_tokens is None:
            raise RuntimeError(f"{base_url}: the stream ended without a usage chunk")
        return usage_tokens, ttft

    return one_request


def aiohttp_target(base_url: str, api_key: str, args: argparse.Namespace, stack: contextlib.AsyncExitStack
                   ) -> RequestFn:
    """Streams chat completions with a bare aiohttp POST, reading the SSE lines itself, as vLLM's own serving
    benchmark (`vllm bench serve`) does: a load generator whose per-request cost stays small next to the
    server's, so that a TTFT measures the server and not the client's object model (the OpenAI SDK builds
    pydantic objects for every chunk; see --client)."""
    import aiohttp

    session = aiohttp.ClientSession(
        base_url=base_url.rstrip("/") + "/",
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=aiohttp.ClientTimeout(total=600),
        connector=aiohttp.TCPConnector(limit=0),  # as many connections as clients: none waits for a socket
    )
    stack.push_async_callback(session.close)

    async def one_request(round_no: int, c: int) -> tuple[int, float | None]:
        body = chat_request(args, round_no, c)
        sent = time.perf_counter()
        ttft, usage_tokens = None, None
        async with session.post("chat/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"{base_url}: HTTP {response.status}: {await response.text()}")
            async for line in response.content:  # one SSE line at a time
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                choices = chunk.get("choices")
                if ttft is None and choices and choices[0].get("delta", {}).get("content"):
                    ttft = time.perf_counter() - sent
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"]["completion_tokens"]
        if usage_tokens is None:
            raise RuntimeError(f"{base_url}: the stream ended without a usage chunk")
        return usage_tokens, ttft

    return one_request


HTTP_CLIENTS = {"aiohttp": aiohttp_target, "openai": openai_target}


def grpc_target(address: str, args: argparse.Namespace, stack: contextlib.AsyncExitStack) -> RequestFn:
    """GenerateStream on the policy service, with the request the gateway would build for the same chat."""
    import grpc

    from alignloop.v1 import policy_pb2 as pb
    from alignloop.v1 import policy_pb2_grpc as pb_grpc

    channel = grpc.aio.insecure_channel(address)
    stack.push_async_callback(channel.close)
    stub = pb_grpc.PolicyServiceStub(channel)

    async def one_request(round_no: int, c: int) -> tuple[int, float | None]:
        request = pb.GenerateRequest(
            request_id=f"bench-grpc-{round_no}-{c}-{time.monotonic_ns()}",
            chat=pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"])
                                           for m in messages_for(round_no, c)]),
            sampling=pb.SamplingParams(n=1, temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True))
        sent = time.perf_counter()
        ttft, tokens = None, 0
        async for msg in stub.GenerateStream(request, timeout=600):
            for d in msg.deltas:
                tokens += len(d.token_ids)
                if ttft is None and d.text:
                    ttft = time.perf_counter() - sent
        return tokens, ttft

    return one_request


def raw_target(settings: Settings, model_dir: Path, args: argparse.Namespace, stack: contextlib.AsyncExitStack
               ) -> RequestFn:
    """The engine alone: build_engine, fed token ids made and rendered the way the policy service does."""
    from transformers import AutoTokenizer

    from services.policy.engine import build_engine, engine_input

    with err.status("raw: building the vLLM engine in this process"):
        engine = build_engine(settings, model_dir, served_name=POLICY_MODEL_NAME)
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    holder = [engine]

    def shutdown() -> None:
        holder.pop().shutdown()
        # No reference may outlive this: at interpreter exit, AsyncLLM.__del__ would call shutdown() again on
        # half-torn-down modules (TypeError).

    stack.callback(shutdown)
    del engine
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)

    def prompt_ids(round_no: int, c: int) -> list[int]:
        # As services/policy/engine.prepare does for chat: the template adds the special tokens itself.
        text = tokenizer.apply_chat_template(messages_for(round_no, c), add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)

    # Tokenised beforehand: this target measures the engine, not the tokenizer.
    prompts = {(r, c): prompt_ids(r, c) for r in range(args.rounds + 1) for c in range(args.concurrency)}
    prompts |= {(args.rounds + 1 + i, i): prompt_ids(args.rounds + 1 + i, i) for i in range(args.solo)}

    async def one_request(round_no: int, c: int) -> tuple[int, float | None]:
        sent = time.perf_counter()
        ttft, tokens = None, 0
        inputs = engine_input(holder[0], prompts[round_no, c])
        async for output in holder[0].generate(inputs, params, f"bench-{round_no}-{c}"):
            delta = output.outputs[0]
            tokens += len(delta.token_ids)
            if ttft is None and delta.text:
                ttft = time.perf_counter() - sent
        return tokens, ttft

    return one_request


# ---- servers -----------------------------------------------------------------------------------------------
def free_port() -> int:
    """A port nothing listens on now (the OS picks it)."""
    return free_ports(1)[0]


def start(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Starts `argv` in its own process group (vLLM forks engine processes) with output to `log_path`. Like
    the supervisor's children, it gets SIGTERM if this process dies without stopping it (SIGKILL)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv, preexec = with_parent_death_signal(argv)
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=preexec)  # noqa: PLW1509 (only without setpriv)


def stop(proc: subprocess.Popen, name: str, timeout_s: float = 60.0) -> None:
    """SIGTERM to the process group, SIGKILL once `timeout_s` has passed (the supervisor's own routine)."""
    with err.status(f"stopping {name}"):
        stop_groups([proc.pid], timeout_s)
    proc.wait()


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, name: str, log_path: Path,
               timeout_s: float) -> None:
    """Polls `ready` until it holds; fails if the process exits or the time is up, pointing at its log."""
    started = time.monotonic()
    with err.status(f"starting {name} (log: {log_path})") as status:
        while not ready():
            elapsed = time.monotonic() - started
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} while starting; "
                                   f"see {log_path}")
            if elapsed > timeout_s:
                raise RuntimeError(f"{name} was not ready after {timeout_s:.0f} s; see {log_path}")
            status.update(f"starting {name}: {elapsed:.0f} s (log: {log_path})")
            time.sleep(0.5)
    err.print(f"[green]✓[/] {name} ready in {time.monotonic() - started:.0f} s")


@contextlib.contextmanager
def alignloop_up(settings: Settings, args: argparse.Namespace, meter: CpuMeter
                 ) -> Iterator[tuple[str, str, str]]:
    """`alignloop up` on free ports with the benchmark's settings; yields the gateway's /v1 URL, the app key and
    the policy service's gRPC address.
    Its supervisor and every component it started are parts of the alignloop target in `meter`."""
    # Every port free, so that a stack on the default ports, or the previous run's still letting go of its
    # own, cannot fail the start.
    names = [name for name in Settings.model_fields if name.endswith("_port")]
    settings = settings.model_copy(update=dict(zip(names, free_ports(len(names)))))
    log_path = settings.home / "logs" / "bench-alignloop-up.log"
    offset = log_path.stat().st_size if log_path.exists() else 0  # the log is appended to across runs
    proc = start([str(Path(sys.executable).parent / "alignloop"), "up"], settings.to_env(), log_path)
    try:
        def up() -> bool:
            with open(log_path, "rb") as f:
                f.seek(offset)
                return b"alignloop is up" in f.read()

        wait_until(up, proc, "alignloop", log_path, args.start_timeout)
        app_key = json.loads(settings.credentials_path.read_text())["app_key"]
        meter.add("alignloop", "supervisor", proc.pid, alone=True)
        for component in (read_state(settings) or {}).get("components", []):
            meter.add("alignloop", component["name"], component["pid"])
        yield f"{settings.gateway_url}/v1", app_key, f"{settings.host}:{settings.policy_port}"
    finally:
        stop(proc, "alignloop")


@contextlib.contextmanager
def http_server(name: str, part: str, argv: Callable[[int], list[str]], env: dict[str, str], settings: Settings,
                args: argparse.Namespace, meter: CpuMeter) -> Iterator[tuple[str, str]]:
    """`argv(port)` on a free port, as target `name` (its process is `part` in `meter`); yields its /v1 URL and
    API key once /health answers, and stops it afterwards."""
    port = free_port()
    log_path = settings.home / "logs" / f"bench-{name}.log"
    proc = start(argv(port), env, log_path)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), proc, name, log_path, args.start_timeout)
        meter.add(name, part, proc.pid)
        yield f"http://127.0.0.1:{port}/v1", "EMPTY"
    finally:
        stop(proc, name)


def vllm_server(settings: Settings, model_dir: Path, args: argparse.Namespace, meter: CpuMeter
                ) -> contextlib.AbstractContextManager[tuple[str, str]]:
    """vLLM's OpenAI server over the same folder with build_engine's engine arguments as flags."""
    def argv(port: int) -> list[str]:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", POLICY_MODEL_NAME,
            "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", str(settings.max_model_len), "--dtype", serving_dtype(settings.dtype),
            "--max-num-seqs", str(settings.max_num_seqs), "--stream-interval", str(settings.stream_interval),
            "--scheduling-policy", settings.scheduling_policy,
            "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
            # Engine statistics as build_engine has them (ALIGNLOOP_ENGINE_STATS; on by default, as in vllm serve).
            *([] if settings.engine_stats else ["--disable-log-stats"]),
            # The gateway runs uvicorn with access_log=False; a log line per request here would be unfair to vLLM.
            "--disable-uvicorn-access-log",
        ] + (["--enforce-eager"] if settings.enforce_eager else []) + (
            ["--otlp-traces-endpoint", settings.otlp_traces_endpoint] if settings.otlp_traces_endpoint else [])

    return http_server("vllm-server", "api server", argv, vllm_serving_environment(settings), settings, args,
                       meter)


def http_floor(settings: Settings, args: argparse.Namespace, meter: CpuMeter
               ) -> contextlib.AbstractContextManager[tuple[str, str]]:
    """benchmarks/sse_floor.py: no model, the client's and HTTP's cost alone."""
    return http_server("http-floor", "floor server",
                       lambda port: [sys.executable, str(REPO_ROOT / "benchmarks" / "sse_floor.py"), "--port",
                                     str(port)], {}, settings, args, meter)


# ---- report ------------------------------------------------------------------------------------------------
def cpu_table(results: dict[str, Result]) -> Table:
    """CPU milliseconds per generated token, by part: where each target spends the machine."""
    table = Table(title="CPU ms per generated token during the measured rounds (parts using ≥ 0.05 ms)")
    table.add_column("target / part", no_wrap=True)
    table.add_column("CPU ms/token", justify="right")
    for name, r in results.items():
        if not r.tokens:
            continue
        per_token = {part: cpu * 1000 / r.tokens for part, cpu in r.cpu_s.items()}
        machine = per_token.pop("machine", 0.0)
        table.add_row(f"[bold]{name}[/]", f"[bold]{sum(per_token.values()):.2f}[/]")
        for part, ms in sorted(per_token.items(), key=lambda kv: -kv[1]):
            if ms >= 0.05:
                table.add_row(f"  {part}", f"{ms:.2f}")
        table.add_row("  [dim]whole machine[/]", f"[dim]{machine:.2f}[/]")
    return table


def report(results: dict[str, Result], settings: Settings, args: argparse.Namespace) -> dict:
    """Prints the table and the ratios; returns the JSON summary."""
    table = Table(title=f"{args.model}: {args.concurrency} streaming clients, max_tokens={args.max_tokens}, "
                        f"{args.rounds} round(s)")
    # Requests per target (rounds × concurrency) are in the title and the JSON: the table must fit 80 columns.
    # TTFT columns are in ms; "solo" is one request at a time.
    for col in ("target", "tok/s", "TTFT p50", "TTFT p95", "solo p50", "tokens", "wall s"):
        table.add_column(col, justify="left" if col == "target" else "right", no_wrap=True)
    for name, r in results.items():
        s = r.summary()
        table.add_row(name, f"{s['tokens_per_s']:.1f}", f"{s['ttft_p50_ms']:.1f}", f"{s['ttft_p95_ms']:.1f}",
                      f"{s['solo_ttft_p50_ms']:.1f}", str(s["completion_tokens"]), f"{s['wall_s']:.2f}")
    out.print(table)
    out.print(cpu_table(results))

    def p50(name: str, solo: bool = False) -> float | None:
        if name not in results:
            return None
        return percentile(results[name].solo_ttft_ms if solo else results[name].ttft_ms, 50)

    def ci(a: str, b: str, solo: bool = False) -> tuple[float, float] | None:
        if a not in results or b not in results:
            return None
        pick = (lambda r: r.solo_ttft_ms) if solo else (lambda r: r.ttft_ms)
        return median_difference_ci(pick(results[a]), pick(results[b]))

    ratio = ratio_ci = added = vllm_added = solo_added = vllm_solo_added = vs_vllm = None
    cpu_ratio = cpu_ratio_ci = None
    if "alignloop" in results and "vllm-server" in results and results["vllm-server"].tokens_per_s:
        ours, theirs = results["alignloop"], results["vllm-server"]
        ratio = ours.tokens_per_s / theirs.tokens_per_s
        ratio_ci = paired_ratio_ci(ours.round_tokens_per_s, theirs.round_tokens_per_s)
        # What each serving path costs the machine per token: on cores the engine keeps busy, a path that
        # spends less leaves more to the forward pass.
        if ours.cpu_ms_per_token and theirs.cpu_ms_per_token:
            cpu_ratio = ours.cpu_ms_per_token / theirs.cpu_ms_per_token
        cpu_ratio_ci = paired_ratio_ci(ours.round_cpu_ms_per_token, theirs.round_cpu_ms_per_token)
    if "raw" in results:
        if "alignloop" in results:
            added = p50("alignloop") - p50("raw")
            solo_added = p50("alignloop", solo=True) - p50("raw", solo=True)
        if "vllm-server" in results:
            vllm_added = p50("vllm-server") - p50("raw")
            vllm_solo_added = p50("vllm-server", solo=True) - p50("raw", solo=True)
    if "alignloop" in results and "vllm-server" in results:
        vs_vllm = p50("alignloop") - p50("vllm-server")
    # Where alignloop's one-at-a-time milliseconds go: the gateway's hop (HTTP in, SSE out, the gRPC call) and
    # the policy service's (gRPC in, tokenising, the engine behind it), each measured on the same requests.
    gateway_share = policy_share = None
    if "policy-grpc" in results:
        gateway_share = p50("alignloop", solo=True) - p50("policy-grpc", solo=True)
        if "raw" in results:
            policy_share = p50("policy-grpc", solo=True) - p50("raw", solo=True)

    # No HTTP server can answer faster than the bare one: what the servers add beyond it is their own.
    floor, floor_solo = p50("http-floor"), p50("http-floor", solo=True)
    above_floor = lambda v: None if v is None or floor_solo is None else v - floor_solo  # noqa: E731

    def verdict(ok: bool | None) -> str:
        return "[dim]n/a[/]" if ok is None else ("[green]met[/]" if ok else "[red]NOT met[/]")

    ratio_ok = None if ratio is None else ratio >= MIN_THROUGHPUT_RATIO
    # Under 16 simultaneous requests the raw engine receives all of them in one instant and prefills them in
    # one batch, while HTTP clients arrive spread out; its p50 TTFT can then exceed a server's, and "added" goes
    # negative. Only one request at a time isolates what a serving path adds, so the target must hold there too.
    added_ok = None if added is None or solo_added is None else max(added, solo_added) <= MAX_ADDED_TTFT_MS
    fmt = lambda v, unit: "n/a" if v is None else f"{v:.2f}{unit}"  # noqa: E731

    def with_ci(value: float | None, interval: tuple[float, float] | None) -> str:
        if value is None:
            return "n/a"
        return f"{value:.2f} ms" + ("" if interval is None else f" [95% CI {interval[0]:.1f} to {interval[1]:.1f}]")

    n = args.concurrency
    out.print(f"throughput alignloop / vllm-server: {fmt(ratio, '×')}  "
              f"(target ≥ {MIN_THROUGHPUT_RATIO:.1f}×: {verdict(ratio_ok)})")
    if ratio_ci is not None:
        _, low, high = ratio_ci
        side = ("above" if low > MIN_THROUGHPUT_RATIO else "below" if high < MIN_THROUGHPUT_RATIO
                else "on both sides of")
        out.print(f"  per round: geometric mean {ratio_ci[0]:.3f}×, 95% CI {low:.3f}× to {high:.3f}× "
                  f"({args.rounds} rounds), {side} the target")
    if cpu_ratio is not None:
        line = f"CPU per token alignloop / vllm-server: {cpu_ratio:.3f}×"
        if cpu_ratio_ci is not None:
            line += (f"  (per round: geometric mean {cpu_ratio_ci[0]:.3f}×, 95% CI {cpu_ratio_ci[1]:.3f}× to "
                     f"{cpu_ratio_ci[2]:.3f}×)")
        out.print(line + "; below 1.0, alignloop's path leaves more of the cores to its engine")
    out.print(f"added TTFT p50, alignloop − raw:    {with_ci(added, ci('alignloop', 'raw'))} with {n} clients; "
              f"{with_ci(solo_added, ci('alignloop', 'raw', solo=True))} one request at a time  "
              f"(target ≤ {MAX_ADDED_TTFT_MS:.0f} ms in both: {verdict(added_ok)})")
    out.print(f"added TTFT p50, vllm-server − raw:  {with_ci(vllm_added, ci('vllm-server', 'raw'))} with {n} "
              f"clients; {with_ci(vllm_solo_added, ci('vllm-server', 'raw', solo=True))} one request at a time  "
              "(for reference)")
    # The same HTTP clients on both sides: the arrival spread that the raw target does not have cancels out.
    out.print(f"TTFT p50, alignloop − vllm-server:  {with_ci(vs_vllm, ci('alignloop', 'vllm-server'))} with {n} "
              "clients")

    if gateway_share is not None:
        out.print(f"one at a time, alignloop − policy-grpc (the gateway's share): "
                  f"{with_ci(gateway_share, ci('alignloop', 'policy-grpc', solo=True))}; policy-grpc − raw "
                  f"(the policy service's share): {with_ci(policy_share, ci('policy-grpc', 'raw', solo=True))}")

    if floor_solo is not None:
        out.print(f"http floor ({args.client} client and one HTTP hop, no model): TTFT p50 {fmt(floor, ' ms')} "
                  f"with {n} clients, {fmt(floor_solo, ' ms')} one request at a time; one at a time, beyond it, "
                  f"alignloop adds {fmt(above_floor(solo_added), ' ms')} to the raw engine and vllm-server "
                  f"{fmt(above_floor(vllm_solo_added), ' ms')}")

    rounded = lambda v: None if v is None else round(v, 3)  # noqa: E731
    return {
        "throughput_ratio_vs_vllm_server": rounded(ratio),
        # From the rounds paired by index: their geometric mean and its 95% interval.
        "throughput_ratio_per_round_geomean": None if ratio_ci is None else rounded(ratio_ci[0]),
        "throughput_ratio_ci95": None if ratio_ci is None else [rounded(v) for v in ratio_ci[1:]],
        # CPU ms per token of alignloop's processes over vLLM's server's (the benchmark's clients in both):
        # pooled over the rounds, then from the rounds paired by index, with a 95% interval.
        "cpu_per_token_ratio_vs_vllm_server": rounded(cpu_ratio),
        "cpu_per_token_ratio_per_round_geomean": None if cpu_ratio_ci is None else rounded(cpu_ratio_ci[0]),
        "cpu_per_token_ratio_ci95": None if cpu_ratio_ci is None else [rounded(v) for v in cpu_ratio_ci[1:]],
        "added_ttft_p50_ms": rounded(added),
        "vllm_server_added_ttft_p50_ms": rounded(vllm_added),
        "solo_added_ttft_p50_ms": rounded(solo_added),
        "vllm_server_solo_added_ttft_p50_ms": rounded(vllm_solo_added),
        "solo_added_ttft_p50_ms_ci95": ci("alignloop", "raw", solo=True),
        "ttft_p50_ms_vs_vllm_server": rounded(vs_vllm),
        "solo_gateway_share_ms": rounded(gateway_share),
        "solo_policy_service_share_ms": rounded(policy_share),
        "http_floor_ttft_p50_ms": rounded(floor),
        "http_floor_solo_ttft_p50_ms": rounded(floor_solo),
        "solo_added_ttft_above_http_floor_ms": rounded(above_floor(solo_added)),
        "vllm_server_solo_added_ttft_above_http_floor_ms": rounded(above_floor(vllm_solo_added)),
        "throughput_target_met": ratio_ok,
        "ttft_target_met": added_ok,
        # The two halves of that verdict, each on its own.
        "ttft_target_met_16_at_once": None if added is None else added <= MAX_ADDED_TTFT_MS,
        "ttft_target_met_one_at_a_time": None if solo_added is None else solo_added <= MAX_ADDED_TTFT_MS,
        "targets": {name: r.summary() for name, r in results.items()},
        "model": args.model,
        "client": args.client,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "engine": {"max_model_len": settings.max_model_len, "dtype": serving_dtype(settings.dtype),
                   "max_num_seqs": settings.max_num_seqs, "enforce_eager": settings.enforce_eager,
                   "stream_interval": settings.stream_interval},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2",
                   help="the model alignloop registers (tiny: a random 0.4M model, for a quick check)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    # Five: the throughput ratio's interval comes from the rounds' spread, and with three its t factor is 4.3.
    p.add_argument("--rounds", type=int, default=5, help="measured rounds, after one warm-up round")
    p.add_argument("--solo", type=int, default=30,
                   help="requests sent one at a time after the rounds (each target in turn)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--client", choices=tuple(HTTP_CLIENTS), default="aiohttp",
                   help="the HTTP targets' client: a bare aiohttp stream reader, as vLLM's serving benchmark "
                        "uses (default), or the official OpenAI SDK, as an application would")
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile / graphs, in every target")
    p.add_argument("--stream-interval", type=int, default=None,
                   help="tokens per streamed piece after the first, in every target (default: "
                        "ALIGNLOOP_STREAM_INTERVAL, else 1)")
    p.add_argument("--home", type=Path, default=None,
                   help="ALIGNLOOP_HOME (default .alignloop/bench/MODEL, reused between runs)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to be ready")
    args = p.parse_args(argv)
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(wanted) - set(TARGETS):
        p.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    if "policy-grpc" in wanted and "alignloop" not in wanted:
        p.error("the policy-grpc target calls the alignloop stack's policy service: add the alignloop target")
    # Fixed order: alignloop first, as it registers and fetches the model the others load.
    args.targets = [t for t in TARGETS if t in wanted]
    return args


def unwind_on_sigterm() -> None:
    """Makes SIGTERM (from `timeout` or a job runner) unwind the benchmark as Ctrl-C does, so that every
    target's `finally` stops it. The targets run in their own sessions, which a signal to this process's group
    does not reach: without this they would be left running."""
    def on_sigterm(signum: int, _frame) -> None:
        # A second SIGTERM while the targets stop must not cut their stopping short. (A no-op handler, not
        # SIG_IGN, which a child started from here would inherit.)
        signal.signal(signal.SIGTERM, lambda *_: None)
        err.print(f"\n{signal.Signals(signum).name}: stopping the targets")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    unwind_on_sigterm()
    # vLLM logs to stdout by default; the in-process engine (and its spawned processes) must keep stdout for
    # the table and the JSON line.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    home = (args.home or REPO_ROOT / ".alignloop" / "bench" / args.model).resolve()
    # The settings every target shares: whatever ALIGNLOOP_* variables say, plus the benchmark's own choices.
    overrides = {"home": home, "bootstrap_model": args.model}
    if args.enforce_eager:
        overrides["enforce_eager"] = True
    if args.stream_interval is not None:
        overrides["stream_interval"] = args.stream_interval
    settings = Settings(**overrides)
    settings.ensure_dirs()
    model_dir = settings.models_dir / POLICY_MODEL_NAME / "v1"
    err.print(f"home {home}; targets {', '.join(args.targets)}")

    meter = CpuMeter()
    with contextlib.ExitStack() as servers:
        urls = {}
        if "alignloop" in args.targets:
            gateway_url, app_key, policy_address = servers.enter_context(alignloop_up(settings, args, meter))
            urls["alignloop"] = gateway_url, app_key
        if not (model_dir / "config.json").exists():
            sys.exit(f"no model in {model_dir}: run once with the alignloop target (it registers and fetches it)")
        if "vllm-server" in args.targets:
            urls["vllm-server"] = servers.enter_context(vllm_server(settings, model_dir, args, meter))
        if "http-floor" in args.targets:
            urls["http-floor"] = servers.enter_context(http_floor(settings, args, meter))

        async def run() -> dict[str, Result]:
            async with contextlib.AsyncExitStack() as stack:
                http_target = HTTP_CLIENTS[args.client]
                targets = {name: http_target(url, key, args, stack) for name, (url, key) in urls.items()}
                for name in targets:
                    # The HTTP clients run here: their CPU is part of every HTTP target's rounds.
                    meter.add(name, "benchmark clients", os.getpid(), alone=True)
                if "policy-grpc" in args.targets:
                    targets["policy-grpc"] = grpc_target(policy_address, args, stack)
                    meter.add("policy-grpc", "benchmark clients", os.getpid(), alone=True)
                    if "policy" in meter.roots.get("alignloop", {}):
                        meter.add("policy-grpc", "policy", meter.roots["alignloop"]["policy"][0])
                if "raw" in args.targets:
                    targets["raw"] = raw_target(settings, model_dir, args, stack)
                    # Here the clients and the engine's frontend share this process; its engine core is a child.
                    meter.add("raw", "benchmark clients + AsyncLLM", os.getpid())
                return await measure(targets, args, meter)

        results = asyncio.run(run())

    summary = report(results, settings, args)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
