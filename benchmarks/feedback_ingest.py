"""Feedback ingest: events/s from an HTTP request to a row in the store, beside a raw Kafka producer.

The path measured, each hop a real process on free ports (tests/integration/feedback_stack.py: FeedbackStack):

  client ─HTTP─▶ gateway ─gRPC─▶ collector ─acks=all, idempotent─▶ Kafka (Tansu) ─▶ materializer ─▶ store

The collector validates each item against the stored completion records, so those are produced to Kafka
first (as the gateway's completion log would) and stored before anything is timed. Every feedback event points
at its own completion (--completions defaults to --events per phase), as in real life each answer gets about
one vote; that also keeps the collector's completion cache from answering for the store.

Phases, one after another, each after the previous one is fully stored:

  warm-up   --warmup events, single and batched, not reported
  single    --events requests POST /v1/feedback, --concurrency keep-alive connections
  batched   --events events as POST /v1/feedback/batch of --batch-size items
  raw       a kafka-python KafkaProducer (acks=all, idempotent, linger_ms=5) writes --events FeedbackRecordV1
            records, serialised beforehand, to a topic of its own in the same broker; flush

"acknowledged/s" counts the feedback ids the gateway returned over the time to the last response; "stored/s"
(the headline, end to end) counts them over the time until the store holds every one of them. Each phase tags
its events with its own `comment`, so the count check is exact: lost = acknowledged events whose id is not in
the store (an id returned twice counts as lost once); duplicated = rows with the phase's tag beyond one per
acknowledged id (the primary key rules out two rows per id, so this catches rows nobody was told about). The
client does not retry; a failed request is reported, not hidden.

The client encodes every request beforehand and speaks HTTP/1.1 over asyncio streams (uvloop when installed),
so that on a small machine it takes little of the CPU it measures; --client aiohttp uses aiohttp instead. Its
own CPU time is reported, and so is each stack process's, and the rest of the machine's (other users).

    .venv/bin/python benchmarks/feedback_ingest.py                           # SQLite, 20,000 events per phase
    .venv/bin/python benchmarks/feedback_ingest.py --store postgresql        # a fresh database, dropped after
    .venv/bin/python benchmarks/feedback_ingest.py --events 2000             # quick check

The last line on stdout is a JSON object with the figures; everything else about progress goes to stderr.
Targets are printed next to the figures, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script: `alignloop`, `services` and `tests` importable

from sqlalchemy import Engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from alignloop import credentials  # noqa: E402
from benchmarks.serving import cpu_seconds, machine_busy_seconds, percentile  # noqa: E402
from alignloop.kafka_admin import ensure_topics  # noqa: E402
from alignloop.topics import ChatMessageV1, FeedbackRecordV1, prompt_hash  # noqa: E402
from tests.integration.feedback_stack import FeedbackStack, feedback_settings  # noqa: E402

# Targets of the brief, on a 2-core machine: printed with the figures, never asserted.
TARGET_BATCHED_EVENTS_PER_S = 5_000.0
TARGET_SINGLE_REQUESTS_PER_S = 1_500.0

RAW_TOPIC = "alignloop.bench.feedback-raw.v1"
POLL_INTERVAL_S = 0.02  # how often the store is asked whether a phase is all there: the end-to-end resolution
COMPLETION_CHUNK = 5_000  # ids per "are they stored?" query (SQLite allows 32,766 bound parameters)

err = Console(stderr=True)
out = Console(soft_wrap=True)


# ---- results -----------------------------------------------------------------------------------------------
@dataclass
class Phase:
    """What one measured phase sent, got back and found stored."""

    name: str
    marker: str  # the `comment` every event of this phase carries
    events: int = 0
    requests: int = 0
    ok_requests: int = 0
    failures: Counter = field(default_factory=Counter)  # HTTP status (0: no response) -> requests
    failure_sample: str = ""
    acked_ids: list[str] = field(default_factory=list)
    http_s: float = 0.0
    stored_s: float | None = None  # None: not all acknowledged ids were stored within --store-timeout
    latencies_ms: list[float] = field(default_factory=list)
    client_http_cpu_s: float = 0.0  # this process's CPU time from the first request to the last response
    cpu_s: dict[str, float] = field(default_factory=dict)  # per process, from the start until stored
    redelivered: int = 0  # copies the materializer found already stored (dropped by the primary key)
    stored_rows: int = 0
    lost: int = 0
    duplicated: int = 0

    @property
    def acked(self) -> int:
        return len(self.acked_ids)

    @property
    def acked_per_s(self) -> float:
        return self.acked / self.http_s if self.http_s else 0.0

    @property
    def stored_per_s(self) -> float | None:
        return (self.acked - self.lost) / self.stored_s if self.stored_s else None

    def summary(self) -> dict:
        return {
            "events": self.events,
            "requests": self.requests,
            "ok_requests": self.ok_requests,
            "failed_requests": dict(sorted((str(k), v) for k, v in self.failures.items())),
            "acknowledged": self.acked,
            "stored_rows": self.stored_rows,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "redelivered_dropped_by_key": self.redelivered,
            "http_s": round(self.http_s, 3),
            "stored_s": None if self.stored_s is None else round(self.stored_s, 3),
            "acknowledged_per_s": round(self.acked_per_s, 1),
            "stored_per_s": None if self.stored_per_s is None else round(self.stored_per_s, 1),
            "latency_p50_ms": round(percentile(self.latencies_ms, 50), 2),
            "latency_p99_ms": round(percentile(self.latencies_ms, 99), 2),
            "client_http_cpu_s": round(self.client_http_cpu_s, 3),
            "cpu_s": {k: round(v, 3) for k, v in self.cpu_s.items()},
        }


@dataclass
class RawResult:
    events: int
    acked: int
    wall_s: float
    cpu_s: dict[str, float]

    @property
    def events_per_s(self) -> float:
        return self.acked / self.wall_s if self.wall_s else 0.0


# ---- request bodies ----------------------------------------------------------------------------------------
def feedback_item(i: int, completion_id: str, marker: str) -> dict:
    """Mostly thumbs, every third one a 1..7 rating: the kinds that point at one completion."""
    if i % 3 == 2:
        return {"kind": "rating", "completion_id": completion_id, "value": i % 7 + 1, "comment": marker}
    return {"kind": "thumbs", "completion_id": completion_id, "value": "up" if i % 2 else "down",
            "comment": marker}


def bodies_for(completion_ids: list[str], events: int, marker: str, batch_size: int | None) -> list[bytes]:
    """JSON bodies: one item each (batch_size None) or {"items": [...]} of batch_size items each."""
    items = [feedback_item(i, completion_ids[i % len(completion_ids)], marker) for i in range(events)]
    if batch_size is None:
        return [json.dumps(it, separators=(",", ":")).encode() for it in items]
    return [json.dumps({"items": items[s:s + batch_size]}, separators=(",", ":")).encode()
            for s in range(0, events, batch_size)]


def feedback_ids_of(status: int, body: bytes) -> list[str]:
    """The ids a 2xx answer acknowledged: one for /v1/feedback, one per item for /v1/feedback/batch."""
    if not 200 <= status < 300:
        return []
    doc = json.loads(body)
    if "data" in doc:
        return [d["feedback_id"] for d in doc["data"]]
    return [doc["feedback_id"]]


# ---- HTTP clients ------------------------------------------------------------------------------------------
# A client sends every body once, `concurrency` at a time on keep-alive connections, and returns per request
# (HTTP status, 0 when no answer came; response body or error text; latency in seconds).
Answers = tuple[list[int], list[bytes], list[float]]


def _content_length(head: bytes) -> int:
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        raise ValueError(f"response without content-length: {head[:200]!r}")
    start = at + len(b"\r\ncontent-length:")
    return int(lower[start:lower.index(b"\r\n", start)])


def http_requests(host: str, port: int, path: str, api_key: str, bodies: list[bytes]) -> list[bytes]:
    """Whole HTTP/1.1 POST requests, encoded once, before the clock starts."""
    prefix = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {api_key}\r\n"
              f"Content-Type: application/json\r\n").encode()
    return [prefix + b"Content-Length: %d\r\n\r\n" % len(b) + b for b in bodies]


async def send_raw(host: str, port: int, requests: list[bytes], concurrency: int) -> Answers:
    """HTTP/1.1 over asyncio streams, every request encoded beforehand: the least client CPU per request."""
    statuses, answers, latencies = [0] * len(requests), [b""] * len(requests), [0.0] * len(requests)
    todo = iter(range(len(requests)))  # shared by the workers: the event loop runs one at a time

    async def worker() -> None:
        reader = writer = None
        for i in todo:
            started = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                writer.write(requests[i])
                head = await reader.readuntil(b"\r\n\r\n")
                body = await reader.readexactly(_content_length(head))
                statuses[i], answers[i] = int(head[9:12]), body
                if b"\r\nconnection: close" in head.lower():
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                answers[i] = repr(exc).encode()
                if writer is not None:
                    writer.close()
                reader = writer = None
            latencies[i] = time.perf_counter() - started
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses, answers, latencies


async def send_aiohttp(url: str, api_key: str, bodies: list[bytes], concurrency: int) -> Answers:
    """The same with aiohttp: one session, a TCPConnector of `concurrency` keep-alive connections."""
    import aiohttp

    statuses, answers, latencies = [0] * len(bodies), [b""] * len(bodies), [0.0] * len(bodies)
    todo = iter(range(len(bodies)))
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        async def worker() -> None:
            for i in todo:
                started = time.perf_counter()
                try:
                    async with session.post(url, data=bodies[i]) as resp:
                        answers[i] = await resp.read()
                        statuses[i] = resp.status
                except aiohttp.ClientError as exc:
                    answers[i] = repr(exc).encode()
                latencies[i] = time.perf_counter() - started

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses, answers, latencies


def new_runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


# ---- CPU accounting ----------------------------------------------------------------------------------------
def cpu_sample(stack: FeedbackStack) -> dict[str, float]:
    """CPU seconds (user + system) so far: this process, each stack process, and the whole machine."""
    sample = {"client": time.process_time()}
    for name, proc in stack.procs.items():
        try:
            sample[name] = cpu_seconds(psutil.Process(proc.pid))
        except psutil.Error:
            pass
    sample["machine"] = machine_busy_seconds()
    return sample


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per process CPU seconds between two samples, plus `other`: the rest of the machine (other users)."""
    used = {k: after[k] - before[k] for k in before if k in after and k != "machine"}
    used["other"] = max(0.0, after["machine"] - before["machine"] - sum(used.values()))
    return used


# ---- the store ---------------------------------------------------------------------------------------------
def stored_ids(engine: Engine, marker: str) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT feedback_id FROM feedback WHERE comment = :m"), {"m": marker})
                    .scalars())


def wait_stored(stack: FeedbackStack, marker: str, acked: set[str], inserted_before: int,
                timeout_s: float) -> bool:
    """Polls until every acknowledged id of the phase is stored; False when `timeout_s` passes first.

    The poll reads the materializer's inserted-rows counter, which costs the store nothing (a query every
    20 ms would be a sequential scan taking CPU from what is measured); the ids are checked in the store once
    the counter says they can all be there."""
    deadline = time.monotonic() + timeout_s
    while True:
        if (materializer_count(stack, "inserted") - inserted_before >= len(acked)
                and acked <= set(stored_ids(stack.engine, marker))):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_INTERVAL_S)


def materializer_count(stack: FeedbackStack, outcome: str) -> int:
    """Feedback records the materializer inserted / found stored already ("duplicate"), from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://{stack.settings.host}:{stack.settings.materializer_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = resp.read().decode()
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if (s.name == "alignloop_store_records_total" and s.labels.get("outcome") == outcome
                    and s.labels.get("topic") == "alignloop.feedback.v1"):
                return int(s.value)
    return 0


def redelivered(stack: FeedbackStack) -> int:
    return materializer_count(stack, "duplicate")


@contextmanager
def store_url(kind: str, server: str) -> Iterator[str | None]:
    """None (SQLite in the stack's home), or a fresh PostgreSQL database that is dropped afterwards."""
    if kind == "sqlite":
        yield None
        return
    import psycopg

    name = f"alignloop_bench_{uuid.uuid4().hex[:12]}"
    admin = make_url(server).set(drivername="postgresql", database="postgres")
    admin = admin.render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    err.print(f"created database {name}")
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        err.print(f"dropped database {name}")


# ---- phases ------------------------------------------------------------------------------------------------
def produce_completions(stack: FeedbackStack, api_key: str, n: int, label: str) -> list[str]:
    """n completion records with distinct prompts, produced as the gateway would; returns their ids."""
    ids = []
    for start in range(0, n, COMPLETION_CHUNK):
        prompts = [f"benchmark {label} prompt {i}" for i in range(start, min(n, start + COMPLETION_CHUNK))]
        ids.extend(group[0] for group in stack.produce_completions(api_key, prompts, 1))
    return ids


def run_phase(stack: FeedbackStack, runner: asyncio.Runner, name: str, marker: str, completion_ids: list[str],
              events: int, batch_size: int | None, concurrency: int, args: argparse.Namespace,
              api_key: str) -> Phase:
    """Sends the phase's events, waits until the store holds every acknowledged one, and checks the count."""
    bodies = bodies_for(completion_ids, events, marker, batch_size)
    path = "/v1/feedback" if batch_size is None else "/v1/feedback/batch"
    host, port = stack.settings.host, stack.settings.gateway_port
    if args.client == "raw":
        send = send_raw(host, port, http_requests(host, port, path, api_key, bodies), concurrency)
    else:
        send = send_aiohttp(f"http://{host}:{port}{path}", api_key, bodies, concurrency)
    phase = Phase(name, marker, events=events, requests=len(bodies))
    dropped_before = redelivered(stack)
    inserted_before = materializer_count(stack, "inserted")

    cpu_before = cpu_sample(stack)
    started = time.perf_counter()
    statuses, answers, latencies = runner.run(send)
    phase.http_s = time.perf_counter() - started
    phase.client_http_cpu_s = time.process_time() - cpu_before["client"]

    for status, answer in zip(statuses, answers):
        if 200 <= status < 300:
            phase.ok_requests += 1
        else:
            phase.failures[status] += 1
            if not phase.failure_sample:
                phase.failure_sample = f"{status}: {answer[:300].decode(errors='replace')}"
    phase.latencies_ms = [s * 1000 for s in latencies]
    # Parsed after the clock stopped: the client's cost per request stays small while it measures.
    for status, answer in zip(statuses, answers):
        phase.acked_ids.extend(feedback_ids_of(status, answer))

    if wait_stored(stack, marker, set(phase.acked_ids), inserted_before, args.store_timeout):
        phase.stored_s = time.perf_counter() - started
    phase.cpu_s = cpu_used(cpu_before, cpu_sample(stack))
    phase.redelivered = redelivered(stack) - dropped_before
    check_counts(stack.engine, phase)

    stored = "timed out" if phase.stored_s is None else f"stored in {phase.stored_s:.2f} s"
    failed = f"; failed requests {dict(phase.failures)}, e.g. {phase.failure_sample}" if phase.failures \
        else ""
    err.print(f"  {name}: {phase.acked} of {events} events acknowledged in {phase.http_s:.2f} s, "
              f"{stored}{failed}")
    return phase


def check_counts(engine: Engine, phase: Phase) -> None:
    """lost: acknowledged events not stored; duplicated: the phase's rows beyond one per acknowledged id."""
    rows = stored_ids(engine, phase.marker)
    acked = set(phase.acked_ids)
    found = acked & set(rows)
    phase.stored_rows = len(rows)
    phase.lost = len(phase.acked_ids) - len(found)
    phase.duplicated = len(rows) - len(found)


def feedback_records(completion_ids: list[str], api_key: str, events: int,
                     marker: str) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs shaped as the collector's records for the same kind of events."""
    key_hash, now = credentials.key_hash(api_key), time.time()
    pairs = []
    for i in range(events):
        cid = completion_ids[i % len(completion_ids)]
        item = feedback_item(i, cid, marker)
        rec = FeedbackRecordV1(
            feedback_id=f"fb_{time.time_ns():x}{uuid.uuid4().hex[:12]}", request_hash=uuid.uuid4().hex,
            api_key_hash=key_hash, kind=item["kind"], completion_ids=[cid],
            thumbs_up=item["value"] == "up" if item["kind"] == "thumbs" else None,
            rating=item["value"] if item["kind"] == "rating" else None, comment=marker,
            prompt_hash=prompt_hash([ChatMessageV1(role="user", content=f"benchmark raw prompt {i}")]),
            model_name="alignloop-policy", model_versions=["1"], created_at=now, accepted_at=now,
        )
        pairs.append((rec.feedback_id.encode(), rec.model_dump_json().encode()))
    return pairs


def run_raw(stack: FeedbackStack, pairs: list[tuple[bytes, bytes]],
            warmup: list[tuple[bytes, bytes]]) -> RawResult:
    """A bare KafkaProducer with the collector's delivery guarantees, writing pre-serialised records; the
    `warmup` ones first, untimed."""
    from kafka import KafkaProducer

    bootstrap = stack.settings.kafka_bootstrap
    ensure_topics(bootstrap, {RAW_TOPIC: 3})  # as many partitions as the feedback topic
    producer = KafkaProducer(bootstrap_servers=bootstrap, client_id="bench-raw", acks="all",
                             enable_idempotence=True, linger_ms=5)
    try:
        producer.partitions_for(RAW_TOPIC)  # metadata before the clock starts
        for key, value in warmup:
            producer.send(RAW_TOPIC, key=key, value=value)
        producer.flush(60)

        cpu_before = cpu_sample(stack)
        started = time.perf_counter()
        futures = [producer.send(RAW_TOPIC, key=key, value=value) for key, value in pairs]
        producer.flush(300)
        wall = time.perf_counter() - started
        cpu = cpu_used(cpu_before, cpu_sample(stack))
    finally:
        producer.close(10)
    acked = sum(1 for f in futures if f.succeeded())
    err.print(f"  raw producer: {acked} of {len(pairs)} records acknowledged in {wall:.2f} s")
    return RawResult(events=len(pairs), acked=acked, wall_s=wall, cpu_s=cpu)


# ---- report ------------------------------------------------------------------------------------------------
def verdict(value: float | None, target: float) -> tuple[str, bool]:
    if value is None:
        return "[red]✗ no figure[/]", False
    ok = value >= target
    return ("[green]✓ pass[/]" if ok else "[red]✗ fail[/]"), ok


def report(single: Phase, batched: Phase, raw: RawResult, args: argparse.Namespace) -> dict:
    """Prints the tables and the ratios; returns the JSON summary."""
    title = (f"feedback ingest, {args.store} store: {args.events} events per phase, batches of "
             f"{args.batch_size}, {args.concurrency} connections ({args.client} client), "
             f"{psutil.cpu_count()} cores")
    # The table must fit 80 columns; wall times are in the JSON line and on stderr.
    table = Table(title=title)
    for col in ("phase", "ack/s", "stored/s", "p50 ms", "p99 ms", "target", "met"):
        table.add_column(col, justify="left" if col in ("phase", "met") else "right", no_wrap=True)
    fmt = lambda v, spec=".0f": "—" if v is None else format(v, spec)  # noqa: E731
    single_mark, single_ok = verdict(single.stored_per_s, TARGET_SINGLE_REQUESTS_PER_S)
    batched_mark, batched_ok = verdict(batched.stored_per_s, TARGET_BATCHED_EVENTS_PER_S)
    for phase, target, mark in ((single, TARGET_SINGLE_REQUESTS_PER_S, single_mark),
                                (batched, TARGET_BATCHED_EVENTS_PER_S, batched_mark)):
        table.add_row(phase.name, fmt(phase.acked_per_s), fmt(phase.stored_per_s),
                      f"{percentile(phase.latencies_ms, 50):.1f}",
                      f"{percentile(phase.latencies_ms, 99):.1f}",
                      f"≥ {target:,.0f}", mark)
    table.add_row("raw", fmt(raw.events_per_s), "", "", "", "", "[dim]baseline[/]")
    out.print(table)
    out.print("ack/s: acknowledged events / time to the last response. stored/s (end to end): the same "
              "events / time until the store held every one. raw: a bare KafkaProducer's acknowledged "
              "records / time to send and flush. p50/p99: per HTTP request.")

    def ratio(p: Phase) -> float | None:
        return p.stored_per_s / raw.events_per_s if p.stored_per_s and raw.events_per_s else None

    batched_ratio, single_ratio = ratio(batched), ratio(single)
    out.print(f"end to end / raw producer: batched {fmt(batched_ratio, '.2f')}×, "
              f"single {fmt(single_ratio, '.2f')}×")

    lost, duplicated = single.lost + batched.lost, single.duplicated + batched.duplicated
    for p in (single, batched):
        ok = p.lost == 0 and p.duplicated == 0 and not p.failures
        mark = "[green]✓[/]" if ok else "[red]✗[/]"
        failed = f", {sum(p.failures.values())} requests failed {dict(p.failures)}" if p.failures else ""
        out.print(f"count check {p.name}: {p.events} sent, {p.acked} acknowledged, {p.stored_rows} stored, "
                  f"{p.lost} lost, {p.duplicated} duplicated{failed} {mark}  "
                  f"[dim](redelivered copies dropped by the key: {p.redelivered})[/]")
    if raw.acked != raw.events:
        out.print(f"[red]raw producer: only {raw.acked} of {raw.events} records acknowledged[/]")

    cpu = Table(title="CPU seconds (and % of one core) from the first request until stored")
    cpu.add_column("process", no_wrap=True)
    for name in ("single", "batched", "raw"):
        cpu.add_column(name, justify="right", no_wrap=True)
    walls = (single.stored_s or single.http_s, batched.stored_s or batched.http_s, raw.wall_s)
    labels = {"client": "client (this)", "gateway": "gateway", "feedback": "collector",
              "kafka": "Kafka (Tansu)", "materializer": "materializer",
              "other": "rest + PostgreSQL" if args.store == "postgresql" else "rest of machine"}
    for name, label in labels.items():
        cells = []
        for used, wall in zip((single.cpu_s, batched.cpu_s, raw.cpu_s), walls):
            v = used.get(name)
            cells.append("—" if v is None else f"{v:.2f} ({100 * v / wall:.0f}%)")
        cpu.add_row(label, *cells)
    out.print(cpu)
    for p in (single, batched):
        out.print(f"client CPU while sending, {p.name}: {p.client_http_cpu_s:.2f} s in {p.http_s:.2f} s "
                  f"({100 * p.client_http_cpu_s / p.http_s:.0f}% of one core)")

    rounded = lambda v, n=1: None if v is None else round(v, n)  # noqa: E731
    return {
        "batched_events_per_s": rounded(batched.stored_per_s),
        "single_requests_per_s": rounded(single.stored_per_s),
        "batched_acknowledged_events_per_s": rounded(batched.acked_per_s),
        "single_acknowledged_requests_per_s": rounded(single.acked_per_s),
        "raw_producer_events_per_s": rounded(raw.events_per_s),
        "batched_vs_raw_ratio": rounded(batched_ratio, 3),
        "single_vs_raw_ratio": rounded(single_ratio, 3),
        "lost": lost,
        "duplicated": duplicated,
        "failed_requests": sum(single.failures.values()) + sum(batched.failures.values()),
        "targets": {"batched_events_per_s": TARGET_BATCHED_EVENTS_PER_S,
                    "single_requests_per_s": TARGET_SINGLE_REQUESTS_PER_S},
        "batched_target_met": batched_ok,
        "single_target_met": single_ok,
        "phases": {"single": single.summary(), "batched": batched.summary(),
                   "raw_producer": {"events": raw.events, "acknowledged": raw.acked,
                                    "wall_s": round(raw.wall_s, 3),
                                    "cpu_s": {k: round(v, 3) for k, v in raw.cpu_s.items()}}},
        "store": args.store,
        "events": args.events,
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "batch_concurrency": args.batch_concurrency,
        "completions": args.completions,
        "client": args.client,
        "cores": psutil.cpu_count(),
    }


# ---- main --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432",
                   help="server for --store postgresql; a fresh database is created there and dropped after")
    p.add_argument("--events", type=int, default=20_000,
                   help="events per measured phase (single, batched, raw)")
    p.add_argument("--batch-size", type=int, default=100, help="items per /v1/feedback/batch request")
    p.add_argument("--concurrency", type=int, default=64, help="keep-alive connections of the HTTP client")
    p.add_argument("--batch-concurrency", type=int, default=None,
                   help="connections for the batched phase (default: --concurrency)")
    p.add_argument("--completions", type=int, default=None,
                   help="distinct completions per phase that the events point at (default: --events, "
                        "one vote per answer)")
    p.add_argument("--warmup", type=int, default=500, help="events sent single and batched before timing")
    p.add_argument("--client", choices=("raw", "aiohttp"), default="raw",
                   help="raw: pre-encoded HTTP/1.1 over asyncio streams; aiohttp: aiohttp ClientSession")
    p.add_argument("--completion-wait", type=float, default=2.0,
                   help="feedback_completion_wait_s of the collector; completions are stored before "
                        "timing, so it only bounds how long a missing one would stall a request")
    p.add_argument("--store-timeout", type=float, default=300.0,
                   help="seconds after the last response for the store to hold every acknowledged event")
    p.add_argument("--home", type=Path, default=None,
                   help="ALIGNLOOP_HOME (default .alignloop/bench/feedback); its SQLite store is emptied "
                        "first")
    args = p.parse_args(argv)
    args.batch_concurrency = args.batch_concurrency or args.concurrency
    args.completions = args.completions or args.events
    if min(args.events, args.batch_size, args.concurrency, args.batch_concurrency, args.completions) < 1:
        p.error("--events, --batch-size, --concurrency, --batch-concurrency and --completions must be ≥ 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    home = (args.home or REPO_ROOT / ".alignloop" / "bench" / "feedback").resolve()
    home.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):  # a fresh SQLite store each run (Tansu keeps its topics in memory)
        (home / f"feedback.db{suffix}").unlink(missing_ok=True)
    run_id = uuid.uuid4().hex[:8]
    warmup = min(args.warmup, args.events)

    with store_url(args.store, args.postgres) as url:
        settings = feedback_settings(home, url).model_copy(update={
            "feedback_completion_wait_s": args.completion_wait,
            "feedback_batch_max": max(args.batch_size, 1000),
        })
        stack = FeedbackStack(settings)
        try:
            with err.status("starting Tansu, the store, materializer, collector and gateway"):
                stack.up()
            err.print(f"[green]✓[/] stack up: logs in {settings.logs_dir}, store {settings.store}")
            api_key = stack.key()

            started = time.perf_counter()
            with err.status("producing completion records and waiting until they are stored"):
                ids = {label: produce_completions(stack, api_key, n, f"{run_id} {label}")
                       for label, n in (("warmup", 2 * warmup), ("single", args.completions),
                                        ("batched", args.completions))}
                every = [cid for group in ids.values() for cid in group]
                for start in range(0, len(every), COMPLETION_CHUNK):
                    stack.wait_stored_completions(every[start:start + COMPLETION_CHUNK],
                                                  timeout=args.store_timeout)
            err.print(f"[green]✓[/] {len(every)} completions stored in {time.perf_counter() - started:.1f} s")

            def phase(name: str, completion_ids: list[str], events: int, batched: bool) -> Phase:
                return run_phase(stack, runner, name, f"bench {run_id} {name}", completion_ids, events,
                                 args.batch_size if batched else None,
                                 args.batch_concurrency if batched else args.concurrency, args, api_key)

            with new_runner() as runner:
                if warmup:
                    phase("warm-up single", ids["warmup"][:warmup], warmup, batched=False)
                    phase("warm-up batched", ids["warmup"][warmup:], warmup, batched=True)
                single = phase("single", ids["single"], args.events, batched=False)
                batched = phase("batched", ids["batched"], args.events, batched=True)

            pairs = feedback_records(ids["single"], api_key, args.events + warmup, f"bench {run_id} raw")
            with err.status("raw producer"):
                raw = run_raw(stack, pairs[warmup:], pairs[:warmup])

            # Late rows (a request that failed after Kafka took it) would show up here, not at first count.
            for phase in (single, batched):
                check_counts(stack.engine, phase)
        except Exception:
            for name in ("gateway", "feedback", "materializer"):
                err.print(f"[dim]--- {name} log (tail) ---[/]\n{stack.log(name)[-1500:]}")
            raise
        finally:
            with err.status("stopping the stack"):
                stack.down()

    summary = report(single, batched, raw, args)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
