"""The CPU the gateway spends producing one completion record to Kafka, by producer setting, side by side.

Every served choice becomes an `alignloop.completions.v1` record, produced by the gateway's CompletionLog
(services/gateway/completion_log.py) on threads of its own, off the response path. Those threads still share
the machine's cores with the gateway's event loop and, on a small machine, with the engine. kafka-python does
its work in Python: for each produce request (and, with its client metrics on, for each record) it costs
CPU, so how many records share a produce request (the linger) and whether its metrics are kept decide most of
the cost. This script sends the same records through the real CompletionLog to a real broker (Tansu, started
on free ports) at a steady rate, as a busy gateway would, under each setting in turn:

  before   linger 5 ms, kafka-python's client metrics on (the gateway until 2026-12-07)
  linger   the gateway's linger (LINGER_MS, 50 ms), client metrics on
  metrics  linger 5 ms, client metrics off
  after    the gateway's linger, client metrics off (the gateway now)

and reports the process's CPU per record (the pacing loop, the same in all, included), checking that every
record was acknowledged. Settings take turns, --repeats times; the median of each is reported. The last stdout
line is a JSON object.

    .venv/bin/python benchmarks/completion_log.py                  # 150 records/s, 1,500 per run
    .venv/bin/python benchmarks/completion_log.py --rate 1000      # a busier gateway
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
from rich.console import Console  # noqa: E402

from alignloop.components import broker  # noqa: E402
from alignloop.config import Settings  # noqa: E402
from alignloop.kafka_admin import acked_producer  # noqa: E402
from alignloop.supervisor import Supervisor, free_ports  # noqa: E402
from alignloop.topics import COMPLETIONS_V1, ChatMessageV1, CompletionRecordV1, SamplingV1  # noqa: E402
from services.gateway.completion_log import LINGER_MS, RECORDS, CompletionLog  # noqa: E402

err = Console(stderr=True)

SETTINGS = {  # name -> (linger_ms, client metrics); "after" is what the gateway's CompletionLog.connect uses
    "before": (5, True),
    "linger": (LINGER_MS, True),
    "metrics": (5, False),
    "after": (LINGER_MS, False),
}


def record(i: int) -> CompletionRecordV1:
    """A record the size of a short chat turn's."""
    now = time.time()
    return CompletionRecordV1(
        completion_id=f"cmpl-{uuid.uuid4().hex}", response_id=f"chatcmpl-{uuid.uuid4().hex}",
        choice_index=0,
        messages=[ChatMessageV1(role="system", content="You are a helpful assistant."),
                  ChatMessageV1(role="user", content=f"Question {i}: how do I keep a sourdough starter?")],
        response_text="Feed it flour and water every day, keep it warm, discard half before feeding. " * 3,
        finish_reason="length", prompt_tokens=34, cached_tokens=0, completion_tokens=64,
        model_name="alignloop-policy", model_version="1",
        sampling=SamplingV1(temperature=1.0, max_tokens=64, n=1),
        api_key_hash="0" * 64, stream=True, created_at=now, finished_at=now)


def produced() -> float:
    return RECORDS.labels("produced")._value.get()


def run(bootstrap: str, linger_ms: int, client_metrics: bool, records: list[CompletionRecordV1],
        rate: float) -> float:
    """CPU ms per record, for `records` submitted at `rate` per second and all acknowledged."""
    producer = acked_producer(bootstrap, COMPLETIONS_V1, client_id="bench-completions", linger_ms=linger_ms,
                              client_metrics=client_metrics)
    log = CompletionLog(producer, max_queue=len(records) + 1)
    me = psutil.Process()
    acked_before = produced()
    cpu_before = sum(me.cpu_times()[:2])
    started = time.perf_counter()
    for i, r in enumerate(records):
        log.submit(r)
        if (delay := started + (i + 1) / rate - time.perf_counter()) > 0:
            time.sleep(delay)
    log.close()  # sends what is queued and waits for every ack
    cpu_ms = (sum(me.cpu_times()[:2]) - cpu_before) * 1000 / len(records)
    if (acked := produced() - acked_before) != len(records):
        raise RuntimeError(f"{acked} of {len(records)} records acknowledged")
    return cpu_ms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=150.0, help="records per second (a gateway's answers/s)")
    p.add_argument("--records", type=int, default=1500, help="records per run")
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting, taken in turn")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="al-bench-") as home:
        names = [name for name in Settings.model_fields if name.endswith("_port")]
        settings = Settings(home=Path(home), **dict(zip(names, free_ports(len(names)))))
        settings.ensure_dirs()
        supervisor = Supervisor(settings, console=err)
        supervisor.bring_up([broker(settings)])
        try:
            cpu: dict[str, list[float]] = {name: [] for name in SETTINGS}
            run(settings.kafka_bootstrap, 5, False, [record(i) for i in range(50)], 500)  # topic, connections
            for repeat in range(args.repeats):
                order = list(SETTINGS) if repeat % 2 == 0 else list(SETTINGS)[::-1]
                for name in order:
                    linger_ms, client_metrics = SETTINGS[name]
                    records = [record(i) for i in range(args.records)]
                    ms = run(settings.kafka_bootstrap, linger_ms, client_metrics, records, args.rate)
                    cpu[name].append(ms)
                    err.print(f"  run {repeat + 1}/{args.repeats} {name:8s} (linger {linger_ms} ms, client "
                              f"metrics {'on' if client_metrics else 'off'}): {ms:.3f} CPU ms/record")
        finally:
            supervisor.stop_all()
    result = {"rate_per_s": args.rate, "records": args.records, "repeats": args.repeats}
    for name in SETTINGS:
        result[f"{name}_cpu_ms_per_record"] = round(statistics.median(cpu[name]), 3)
    after = result["after_cpu_ms_per_record"]
    result["cpu_ratio_before_vs_after"] = round(result["before_cpu_ms_per_record"] / after, 2) if after else None
    print(f"CPU per completion record at {args.rate:.0f}/s: before {result['before_cpu_ms_per_record']} ms, "
          f"after {result['after_cpu_ms_per_record']} ms ({result['cpu_ratio_before_vs_after']}×)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
