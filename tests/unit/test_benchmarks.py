"""The benchmark scripts still import: they are run by hand, so a rename elsewhere would otherwise break them
silently (a refactor of the supervisor once did)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py"))


def run_engine_benchmark(stem: str, *args: str) -> dict:
    """Runs benchmarks/`stem`.py, which builds vLLM engines in its own process, with `args`; its JSON line.

    Its home is short: vLLM's IPC sockets live under it, and a socket path may have at most 107 characters. It
    gets no ALIGNLOOP_* or VLLM_* variable of earlier tests (they set vLLM's socket folder in this process).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALIGNLOOP_", "VLLM_"))}
    with tempfile.TemporaryDirectory(prefix="al-") as home:
        out = subprocess.run([sys.executable, str(next(p for p in BENCHMARKS if p.stem == stem)), *args,
                              "--home", home], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Exception ignored" not in out.stderr  # the engines were shut down before the interpreter exits
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_there_are_benchmarks():
    assert len(BENCHMARKS) >= 5


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports_and_has_a_main(path: Path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # runs the module's imports, not its __main__ block
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"


def _load(name: str):
    path = next(p for p in BENCHMARKS if p.stem == name)
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _results(serving, solo_ttft_ms: dict[str, list[float]]) -> dict:
    """Results of each target with these one-at-a-time TTFTs; those with 16 clients are three times longer."""
    results = {}
    for name, ttfts in solo_ttft_ms.items():
        r = serving.Result(name, tokens=100, wall_s=1.0, ttft_ms=[x * 3 for x in ttfts], requests=3)
        r.solo_ttft_ms = ttfts
        results[name] = r
    return results


def test_serving_report_splits_alignloops_added_ttft_between_gateway_and_policy_service():
    serving = _load("serving")
    args = serving.parse_args(["--model", "tiny", "--rounds", "1"])
    summary = serving.report(_results(serving, {
        "alignloop": [20.0, 21.0, 22.0], "policy-grpc": [14.0, 15.0, 16.0], "raw": [10.0, 11.0, 12.0],
        "vllm-server": [18.0, 19.0, 20.0]}), serving.Settings(), args)
    assert summary["solo_added_ttft_p50_ms"] == 10.0  # 21 − 11
    assert summary["solo_gateway_share_ms"] == 6.0  # 21 − 15
    assert summary["solo_policy_service_share_ms"] == 4.0  # 15 − 11
    assert summary["vllm_server_solo_added_ttft_p50_ms"] == 8.0
    assert summary["ttft_target_met"] is False
    assert summary["ttft_target_met_16_at_once"] is False  # 63 − 33
    assert summary["ttft_target_met_one_at_a_time"] is False
    halves = serving.report(_results(serving, {"alignloop": [12.0, 13.0, 14.0], "raw": [10.0, 11.0, 12.0]}),
                            serving.Settings(), args)
    assert halves["ttft_target_met_one_at_a_time"] is True  # 13 − 11
    assert halves["ttft_target_met_16_at_once"] is False  # 39 − 33
    assert halves["ttft_target_met"] is False  # both halves must hold


def test_serving_report_reads_the_servers_added_ttft_beyond_the_http_floor():
    serving = _load("serving")
    args = serving.parse_args(["--model", "tiny", "--rounds", "1"])
    results = _results(serving, {"alignloop": [20.0, 21.0, 22.0], "raw": [10.0, 11.0, 12.0],
                                 "vllm-server": [18.0, 19.0, 20.0], "http-floor": [2.0, 3.0, 4.0]})
    summary = serving.report(results, serving.Settings(), args)
    assert summary["http_floor_solo_ttft_p50_ms"] == 3.0
    assert summary["http_floor_ttft_p50_ms"] == 9.0
    assert summary["solo_added_ttft_above_http_floor_ms"] == 7.0  # (21 − 11) − 3
    assert summary["vllm_server_solo_added_ttft_above_http_floor_ms"] == 5.0  # (19 − 11) − 3
    del results["http-floor"]
    assert serving.report(results, serving.Settings(), args)["solo_added_ttft_above_http_floor_ms"] is None


def test_serving_pairs_rounds_so_the_machines_drift_cancels_out_of_the_throughput_ratio():
    serving = _load("serving")
    # The machine slows fourfold over the run; within each round alignloop is about 5% faster.
    alignloop, vllm_server = [210.0, 105.0, 52.0], [200.0, 100.0, 50.0]
    mean, low, high = serving.paired_ratio_ci(alignloop, vllm_server)
    assert 1.03 < low < mean < high < 1.07
    # The ratios fall on both sides of 1.0: the interval says so.
    _, low, high = serving.paired_ratio_ci([110.0, 90.0, 102.0], [100.0, 100.0, 100.0])
    assert low < 1.0 < high
    assert serving.paired_ratio_ci([110.0], [100.0]) is None  # one round: no spread to read

    args = serving.parse_args(["--model", "tiny", "--rounds", "3"])
    results = _results(serving, {"alignloop": [20.0, 21.0, 22.0], "vllm-server": [18.0, 19.0, 20.0]})
    results["alignloop"].round_tokens_per_s = alignloop
    results["vllm-server"].round_tokens_per_s = vllm_server
    summary = serving.report(results, serving.Settings(), args)
    assert 1.03 < summary["throughput_ratio_ci95"][0] < summary["throughput_ratio_per_round_geomean"] < 1.07
    assert summary["targets"]["alignloop"]["round_tokens_per_s"] == alignloop


def test_serving_compares_the_cpu_each_path_spends_per_token_round_by_round(monkeypatch):
    serving = _load("serving")

    class Meter(serving.CpuMeter):
        """Each snapshot: every part of a target has used 10 ms more, alignloop's stack 20 ms; and the
        machine, which other tenants' steal inflates, 1 s more."""

        def __init__(self) -> None:
            super().__init__()
            self.calls: dict[str, int] = {}

        def snapshot(self, target: str) -> dict[str, float]:
            n = self.calls[target] = self.calls.get(target, 0) + 1
            step = 0.020 if target == "alignloop" else 0.010
            return {"server": n * step, "benchmark clients": n * 0.005, "machine": n * 1.0}

    async def two_tokens(round_no: int, client: int) -> tuple[int, float | None]:
        return 2, 0.01

    monkeypatch.setattr(serving, "settle", lambda *a, **k: None)
    args = serving.parse_args(["--model", "tiny", "--rounds", "2", "--concurrency", "5", "--solo", "0"])
    results = serving.asyncio.run(serving.measure({"alignloop": two_tokens, "vllm-server": two_tokens},
                                                  args, Meter()))
    # 10 tokens a round: alignloop's 25 ms are 2.5 ms a token, vLLM's server's 15 ms 1.5; the machine's
    # second is left out.
    assert results["alignloop"].round_cpu_ms_per_token == pytest.approx([2.5, 2.5])
    assert results["vllm-server"].round_cpu_ms_per_token == pytest.approx([1.5, 1.5])
    assert results["alignloop"].cpu_ms_per_token == pytest.approx(2.5)

    async def nothing_in_round_1(round_no: int, client: int) -> tuple[int, float | None]:
        return (0, None) if round_no == 1 else (2, 0.01)

    silent = serving.asyncio.run(serving.measure({"alignloop": nothing_in_round_1}, args, Meter()))
    assert silent["alignloop"].round_cpu_ms_per_token[0] is None
    assert silent["alignloop"].round_cpu_ms_per_token[1] == pytest.approx(2.5)

    # In the report: alignloop spends 0.9× per token in every round but one, where the machine slowed.
    results["alignloop"].round_cpu_ms_per_token = [9.0, 9.2, 8.8]
    results["vllm-server"].round_cpu_ms_per_token = [10.0, 10.1, 9.9]
    results["alignloop"].cpu_s = {"policy": 1.8, "gateway": 0.9, "machine": 30.0}
    results["vllm-server"].cpu_s = {"server": 3.0, "machine": 6.0}
    for r in results.values():
        r.tokens = 300
    summary = serving.report(results, serving.Settings(), args)
    assert summary["cpu_per_token_ratio_vs_vllm_server"] == pytest.approx(0.9)
    low, high = summary["cpu_per_token_ratio_ci95"]
    assert low < summary["cpu_per_token_ratio_per_round_geomean"] < high < 1.0
    assert summary["targets"]["alignloop"]["round_cpu_ms_per_token"] == [9.0, 9.2, 8.8]

    # A round that produced nothing keeps its place (None), so round 3 still pairs with round 3, and the
    # paired interval declines rather than pairing what is left out of step.
    assert serving.paired_ratio_ci([9.0, None, 8.8], [10.0, 10.1, 9.9]) is None
    results["alignloop"].round_cpu_ms_per_token = [9.0, None, 8.8]
    assert serving.report(results, serving.Settings(), args)["cpu_per_token_ratio_ci95"] is None


def test_serving_varies_which_target_goes_first_and_which_goes_before_each():
    serving = _load("serving")
    names = ["alignloop", "vllm-server", "http-floor", "policy-grpc", "raw"]
    turns = [serving.turn_order(names, k) for k in range(1, 6)]  # the measured rounds of a default run
    assert all(sorted(order) == sorted(names) for order in turns)
    assert len({order[0] for order in turns}) > 1
    for name in names:
        before = {order[order.index(name) - 1] for order in turns if order.index(name) > 0}
        assert len(before) > 1, f"{name} always ran right after {before}"


def test_reward_learning_curve_extrapolates_the_pairs_a_target_accuracy_needs():
    curve = _load("reward_learning_curve")
    # Three points on 50% + 2 points per doubling from 500 pairs: 63% is 6.5 doublings past 500.
    pairs = [500, 1000, 2000]
    fit = curve.fit_log2(pairs, [0.50, 0.52, 0.54], target=0.63)
    assert fit["slope_per_doubling"] == pytest.approx(0.02)
    assert fit["slope_per_doubling_se"] == pytest.approx(0.0, abs=1e-9)
    assert fit["pairs_for_target"] == pytest.approx(500 * 2 ** 6.5)
    noisy = curve.fit_log2(pairs, [0.50, 0.55, 0.54], target=0.63)
    assert noisy["slope_per_doubling_se"] > 0.01  # the points stray from the line: the slope is loose
    # A flat or falling curve never reaches the target.
    assert curve.fit_log2(pairs, [0.52, 0.51, 0.50], target=0.63)["pairs_for_target"] is None
    assert curve.fit_log2([500, 1000], [0.5, 0.52], target=0.63)["slope_per_doubling_se"] is None
    with pytest.raises(ValueError, match="two"):
        curve.fit_log2([500, 500], [0.5, 0.52], target=0.63)
    assert curve.binomial_se(0.56, 908) == pytest.approx(0.0165, abs=1e-4)


def test_sse_floor_streams_a_chat_completion_the_openai_sdk_reads():
    """The floor server's events are what a streamed chat completion looks like to the OpenAI SDK."""
    from openai import OpenAI
    from starlette.testclient import TestClient

    floor = _load("sse_floor")
    with TestClient(floor.app) as http:
        client = OpenAI(base_url=f"{http.base_url}/v1", api_key="k", http_client=http, max_retries=0)
        chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=3, stream=True,
                                                     stream_options={"include_usage": True}))
        assert http.post("/v1/chat/completions", json={"model": "m"}).status_code == 400
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "xxx"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 3


@pytest.mark.parametrize("client", ["aiohttp", "openai"])
def test_serving_http_clients_read_tokens_and_ttft_from_a_real_sse_server(client: str):
    """Both clients of the serving benchmark, against the floor server on a real socket: the completion
    tokens come from the usage chunk, and TTFT from the first non-empty content delta (not the role chunk)."""
    import asyncio
    import contextlib
    import threading
    import time

    import uvicorn

    from alignloop.supervisor import free_ports

    serving, floor = _load("serving"), _load("sse_floor")
    port = free_ports(1)[0]
    server = uvicorn.Server(uvicorn.Config(floor.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the floor server did not start"
            time.sleep(0.01)
        args = serving.parse_args(["--model", "tiny", "--max-tokens", "5", "--client", client])

        async def run() -> list[tuple[int, float | None]]:
            async with contextlib.AsyncExitStack() as stack:
                one_request = serving.HTTP_CLIENTS[args.client](f"http://127.0.0.1:{port}/v1", "k", args, stack)
                return await asyncio.gather(*(one_request(0, c) for c in range(4)))

        done = asyncio.run(run())
    finally:
        server.should_exit = True
        thread.join(10)
    assert [tokens for tokens, _ in done] == [5] * 4
    assert all(ttft is not None and 0 < ttft < 10 for _, ttft in done)


def test_serving_refuses_the_policy_grpc_target_without_the_stack_it_calls():
    serving = _load("serving")
    with pytest.raises(SystemExit):
        serving.parse_args(["--targets", "policy-grpc,raw"])
    assert serving.parse_args(["--targets", "raw,policy-grpc,alignloop"]).targets == ["alignloop", "policy-grpc", "raw"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_serving_stops_its_targets_when_it_is_stopped(tmp_path: Path, sig: signal.Signals):
    """`timeout` or a job runner stops the benchmark with SIGTERM (SIGKILL after `timeout -k`); the servers it
    started in their own sessions must go with it, not be left running (they once were: `alignloop up`, vLLM's
    server, MLflow). SIGTERM unwinds the benchmark, which stops them; SIGKILL leaves that to the parent-death
    signal they were started with."""
    from alignloop.config import POLICY_MODEL_NAME, Settings

    # The benchmark wants the model folder that its alignloop target would fetch; the floor never reads it.
    model_dir = Settings(home=tmp_path).models_dir / POLICY_MODEL_NAME / "v1"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    script = next(p for p in BENCHMARKS if p.stem == "serving")
    bench = subprocess.Popen([sys.executable, str(script), "--targets", "http-floor", "--home", str(tmp_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    floor = None
    try:
        stderr = []
        for line in bench.stderr:  # the floor server is up once the benchmark says so
            stderr.append(line)
            if "http-floor ready" in line:
                break
        else:
            pytest.fail("the benchmark exited before its target was ready:\n" + "".join(stderr))
        floors = [p for p in psutil.Process(bench.pid).children(recursive=True)
                  if "sse_floor.py" in " ".join(p.cmdline())]
        assert len(floors) == 1
        floor = floors[0]
        assert os.getsid(floor.pid) == floor.pid  # its own session: a signal to the benchmark's group misses it

        bench.send_signal(sig)
        returncode = bench.wait(timeout=60)
        if sig == signal.SIGTERM:  # it exits as after Ctrl-C, once it has stopped its targets itself
            assert not floor.is_running(), "the benchmark exited before its floor server had stopped"
            assert returncode == 128 + signal.SIGTERM
        else:
            _, alive = psutil.wait_procs([floor], timeout=10)
            assert not alive, "the floor server outlived the benchmark"
    finally:
        bench.kill()
        bench.wait()
        if floor is not None and floor.is_running():
            floor.kill()


def test_reward_benchmark_reports_held_out_accuracy_by_source_file(tmp_path: Path):
    """Each held-out pair is labelled with the file its line came from, a dropped line notwithstanding; the
    per-file accuracies cover every pair once and average back to the overall accuracy."""
    from alignloop.reward_model import RewardModel
    from pipelines.models_init import build_tiny_reward_model
    from pipelines.reward.datasets import PreferenceGroup
    from pipelines.reward.train import accuracy_by_source, pair_accuracy, pair_margins

    bench = _load("reward_training")
    model_dir = build_tiny_reward_model(tmp_path / "rm")
    sources = ["helpful.jsonl.gz", "harmless.jsonl.gz"] * 5
    groups = [PreferenceGroup(f"eval.jsonl.gz:{i}", (f"\n\nHuman: q{i}\n\nAssistant: yes {'!' * i}",
                                                      f"\n\nHuman: q{i}\n\nAssistant: no"), ((0, 1),))
              for i in range(10) if i != 3]  # a dropped line: ids keep their file line numbers
    labelled = bench.label_sources(groups, sources)
    assert [g.source for g in labelled] == [sources[i] for i in range(10) if i != 3]
    model, tokenizer = RewardModel.load(model_dir)
    by_file = accuracy_by_source(pair_margins(model.eval(), tokenizer, labelled))
    assert {name: v["pairs"] for name, v in by_file.items()} == {"harmless.jsonl.gz": 4,
                                                                  "helpful.jsonl.gz": 5}
    overall = pair_accuracy(model, tokenizer, groups)[0]
    assert sum(v["pairs"] * v["eval_accuracy"] for v in by_file.values()) / 9 == pytest.approx(overall)


def test_reward_probe_finds_a_length_preference_that_flips_between_splits(tmp_path: Path):
    """Chosen answers are the longer ones in the helpful file and the shorter ones in the harmless file: the
    length probe that is told the split gets every held-out pair right; the split's rows are per file; the
    probe whose length weight depends on the question tells the two kinds of question apart by itself."""
    import gzip

    from pipelines.models_init import build_tiny_reward_model
    from pipelines.reward.datasets import parse_hh, read_jsonl

    probe = _load("reward_probe")
    data = tmp_path / "data"
    data.mkdir()
    questions = {"helpful-base.test.jsonl.gz": "what is a good recipe for soup, number {}?",
                 "harmless-base.test.jsonl.gz": "how do i break into my neighbour's house, {}?"}
    for name, longer_wins in (("helpful-base.test.jsonl.gz", True), ("harmless-base.test.jsonl.gz", False)):
        with gzip.open(data / name, "wt") as f:
            for i in range(60):
                short, long = f"ok {i}", " ".join(["sure, here is more detail"] * (3 + i % 5))
                chosen, rejected = (long, short) if longer_wins else (short, long)
                prompt = f"\n\nHuman: {questions[name].format(i)}"
                f.write(json.dumps({"chosen": f"{prompt}\n\nAssistant: {chosen}",
                                    "rejected": f"{prompt}\n\nAssistant: {rejected}"}) + "\n")
    pairs = probe.load_pairs(data)
    assert len(pairs) == 120 and 0 < sum(p.held_out for p in pairs) < 120
    # The probe holds out the pairs that reward_training.py holds out, so their accuracies compare.
    _, eval_file, _ = _load("reward_training").split_files(data, tmp_path)
    held_out = sorted((m[-1]["content"], answer) for m, answer in (parse_hh(row["chosen"])
                                                                   for row in read_jsonl(eval_file)))
    assert held_out == sorted((p.question, p.chosen) for p in pairs if p.held_out)
    assert len(set(held_out)) == len(held_out)  # (question, answer) names one pair
    assert {p.question for p in pairs if p.source.startswith("helpful")} == {
        questions["helpful-base.test.jsonl.gz"].format(i) for i in range(60)}
    backbone = build_tiny_reward_model(tmp_path / "rm") / "backbone"
    rows = {(r["features"], r["with_split"]): r for r in probe.probe(pairs, backbone, max_length=64, l2=1e-4)}
    assert len(rows) == 2 * len(probe.FEATURE_SETS)
    told = rows[("length", True)]
    assert told["eval_accuracy"] == 1.0
    assert told["helpful-base.test.jsonl.gz"] == told["harmless-base.test.jsonl.gz"] == 1.0
    # Without the split, one weight on length cannot be right on both files.
    untold = rows[("length", False)]
    assert min(untold["helpful-base.test.jsonl.gz"], untold["harmless-base.test.jsonl.gz"]) < 0.5
    # Length times the question's embedding: the weight on length follows the kind of question, no split told.
    by_question = rows[("embedding + length + relevance, weighted by the question", False)]
    assert by_question["eval_accuracy"] >= 0.9 > untold["eval_accuracy"]


def test_reward_sweep_chooses_on_validation_pairs_and_reports_held_out_pairs_over_seeds(tmp_path: Path,
                                                                                       monkeypatch, capsys):
    """A rate at which the RM learns beats one at which it cannot, on pairs cut from the training split; the
    winner and the reference setting are then trained on the whole split once per seed and scored on the
    held-out pairs, which the choice never saw."""
    import gzip

    from pipelines.models_init import build_tiny_reward_model

    sweep = _load("reward_sweep")
    fit, validation = sweep.split_validation(list(range(20)), 0.15)
    assert (fit, validation) == (list(range(17)), [17, 18, 19])
    with pytest.raises(ValueError, match="no training groups"):
        sweep.split_validation([1], 0.5)

    data = tmp_path / "data"
    data.mkdir()
    with gzip.open(data / "toy.jsonl.gz", "wt") as f:
        for i in range(240):
            prompt = f"\n\nHuman: tell me about thing {i}"
            f.write(json.dumps({"chosen": f"{prompt}\n\nAssistant: yes, gladly {i}",
                                "rejected": f"{prompt}\n\nAssistant: no {i}"}) + "\n")
    backbone = build_tiny_reward_model(tmp_path / "rm") / "backbone"
    monkeypatch.setattr(sys, "argv", [
        "reward_sweep.py", "--data", str(data), "--backbone", str(backbone), "--lrs", "3e-3,1e-9",
        "--epochs", "2", "--max-lengths", "64", "--batch-sizes", "8", "--seeds", "0,1",
        "--reference", "1e-9,2,64,8", "--device", "cpu"])
    sweep.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    n = result["pairs"]
    assert n["fit"] + n["validation"] == n["train"] and n["validation"] > 0 and n["held_out"] > 0
    assert [(r["lr"], r["seed"]) for r in result["searched"]] == [(3e-3, 0), (1e-9, 0)]
    assert result["best_hyper"] == {"lr": 3e-3, "epochs": 2, "max_length": 64, "batch_size": 8}
    assert max(result["searched"], key=lambda r: r["accuracy"])["lr"] == 3e-3
    for name, lr in (("best", 3e-3), ("reference", 1e-9)):
        assert [(r["lr"], r["seed"]) for r in result["finals"][name]] == [(lr, 0), (lr, 1)]
    assert result["best_held_out_mean"] >= 0.9
    assert result["best_held_out_mean"] > result["reference_held_out_mean"]


def test_priorities_benchmark_runs_both_scheduling_policies_on_real_engines():
    """A short run on the tiny model: both engines serve the batch and the interactive requests, and the JSON
    line has each policy's figures and the ratios (what they say is the benchmark's business, not a test's)."""
    summary = run_engine_benchmark("priorities", "--model", "tiny", "--rounds", "1", "--interactive", "2",
                                   "--batch-clients", "6", "--warmup-s", "0.5")
    for policy in ("fcfs", "priority"):
        assert summary[policy]["ttft_p50_ms"] > 0 and summary[policy]["batch_tokens_per_s"] > 0
    assert summary["interactive_ttft_p50_ratio_fcfs_over_priority"] > 0


def test_affinity_benchmark_runs_both_routings_over_real_replicas():
    """A short run on the tiny model: two policy services on real gRPC servers answer every turn through both
    channels; no first turn finds anything cached (each conversation is new), and the JSON line has each
    routing's figures and the ratios (what they say is the benchmark's business, not a test's)."""
    summary = run_engine_benchmark("affinity", "--model", "tiny", "--replicas", "2", "--rounds", "1",
                                   "--conversations", "4", "--concurrency", "2", "--turns", "3",
                                   "--system-rules", "12", "--question-words", "10", "--answer-tokens", "8")
    for routing in ("round_robin", "conversation"):
        assert summary[routing]["first_turn_cached_tokens"] == 0
        assert 0 < summary[routing]["cached_share"] < 1 and summary[routing]["tokens_per_s"] > 0
    assert summary["ttft_p50_ratio_round_robin_over_conversation"] > 0


def test_serving_dtype_benchmark_runs_both_dtypes_on_real_engines():
    """A short run on the tiny model: an engine in each dtype answers every request, and the JSON line has
    their figures, the ratios and what `auto` chose on this machine."""
    from alignloop.config import serving_dtype

    summary = run_engine_benchmark("serving_dtype", "--model", "tiny", "--rounds", "1", "--solo", "2",
                                   "--concurrency", "4", "--max-tokens", "8")
    for dtype in ("bfloat16", "float32"):
        assert summary[dtype]["tokens_per_s"] > 0 and summary[dtype]["ttft_p50_ms"] > 0
    assert summary["float32_tokens_per_s_ratio"] > 0
    assert summary["auto_chose"] == serving_dtype("auto")


def test_engine_front_end_benchmark_measures_both_ways_of_reading_vllms_environment():
    """A short run on the tiny model: the engine answers in both settings, each has a figure, the ratio is the
    rounds' own, and the engine as build_engine leaves it (as the policy service runs it) reads them once."""
    summary = run_engine_benchmark("engine_front_end", "--model", "tiny", "--rounds", "2", "--concurrency", "4",
                                   "--max-tokens", "8")
    assert summary["read_each_time_us_per_token"] > 0 and summary["read_once_us_per_token"] > 0
    assert summary["read_once_ratio_per_round_geomean"] > 0 and 0 <= summary["rounds_read_once_cheaper"] <= 2
    assert summary["build_engine_reads_once"] is True


def test_grpc_streams_carries_every_token_both_ways_and_reports_each_sides_cost():
    """Per-request streams and one batched stream must deliver the same tokens (the script checks the count),
    or their costs per token are not comparable."""
    out = subprocess.run([sys.executable, str(next(p for p in BENCHMARKS if p.stem == "grpc_streams")),
                          "--concurrency", "4", "--steps", "30", "--step-ms", "1", "--repeats", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # So short a run may fall between two ticks of the CPU clock: its figures may be 0, never missing.
    for mode in ("per_request", "batched"):
        for side in ("server", "client"):
            assert result[f"{mode}_{side}_us_per_token"] >= 0
    for side in ("server", "client"):
        ratio, batched = result[f"{side}_ratio_per_request_vs_batched"], result[f"batched_{side}_us_per_token"]
        assert ratio is None if batched == 0 else ratio == pytest.approx(
            result[f"per_request_{side}_us_per_token"] / batched, abs=0.01)


def test_completion_log_benchmark_gets_every_record_acknowledged_under_each_producer_setting():
    """The script raises if a setting loses a record: its CPU per record would then flatter that setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNLOOP_")}
    out = subprocess.run([sys.executable, str(next(p for p in BENCHMARKS if p.stem == "completion_log")),
                          "--records", "100", "--rate", "500", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("before", "linger", "metrics", "after"):
        assert result[f"{name}_cpu_ms_per_record"] > 0


def test_vllms_server_gets_the_engine_arguments_the_policy_service_builds_its_engine_with(monkeypatch, tmp_path):
    """"Same engine settings": vLLM's server's flags, read by vLLM's own parser, give every engine argument
    that build_engine gives the policy service's engine, for settings away from their defaults."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.engine.async_llm import AsyncLLM

    from alignloop.config import Settings
    from services.policy import engine as policy_engine

    serving = _load("serving")
    settings = Settings(home=tmp_path, max_model_len=1234, max_num_seqs=7, stream_interval=3,
                        enforce_eager=True, engine_stats=False, gpu_memory_utilization=0.5, dtype="float32",
                        scheduling_policy="priority", otlp_traces_endpoint="127.0.0.1:4317")
    # A folder that exists: under HF_HUB_OFFLINE (set by other tests in this process) vLLM looks any other
    # model name up in the hub's local cache.
    model = tmp_path / "model"
    model.mkdir()
    built = []
    monkeypatch.setattr(AsyncLLM, "from_engine_args", classmethod(lambda cls, args: built.append(args)))
    monkeypatch.setattr(policy_engine, "freeze_vllm_environment", lambda: None)
    policy_engine.build_engine(settings, model, served_name="alignloop-policy")
    monkeypatch.setattr(serving, "http_server", lambda name, part, argv, *rest: argv)
    argv = serving.vllm_server(settings, model, None, None)(8000)

    def from_flags(flags: list[str]) -> AsyncEngineArgs:
        return AsyncEngineArgs.from_cli_args(make_arg_parser(FlexibleArgumentParser()).parse_args(flags))

    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    server, policy = from_flags(argv[3:]), built[0]
    # Where vLLM's parser and its dataclass disagree on a default by themselves, neither side set it.
    bare_flags, bare_args = from_flags(["--model", str(model)]), AsyncEngineArgs(model=str(model))
    names = [f.name for f in dataclasses.fields(AsyncEngineArgs)]
    unset = {name for name in names if getattr(bare_flags, name) != getattr(bare_args, name)}
    differ = {name: (getattr(policy, name), getattr(server, name)) for name in names
              if name not in unset | {"served_model_name"} and getattr(policy, name) != getattr(server, name)}
    assert differ == {}
    assert server.served_model_name == [policy.served_model_name]
