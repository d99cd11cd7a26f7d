"""The pipeline runner's orchestration (services/pipeline) with canned step commands: the real runner, store
(SQLite, migrated) and launcher, fake `alignloop` commands, and the registry and services faked."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest

from alignloop import store
from alignloop.config import Settings
from services.pipeline import config as run_config
from services.pipeline import steps as steps_module
from services.pipeline.launcher import LocalLauncher, last_json_line
from services.pipeline.runner import NotCancellable, Runner
from services.pipeline.runs import RunInProgress, RunStore


class CannedLauncher(LocalLauncher):
    """Runs, instead of each `alignloop` command, a Python one-liner printing a canned summary with a canned exit
    status (keyed by the command's first two words), optionally sleeping first."""

    def __init__(self, answers: dict[str, tuple[int, dict, float]]) -> None:
        super().__init__()
        self.answers = answers
        self.calls: list[list[str]] = []

    def launch(self, argv, *, env, log_path, cwd):
        self.calls.append(argv)
        words = argv[argv.index("alignloop.cli") + 1:][:2]
        code, summary, sleep = self.answers[" ".join(words)]
        script = f"import time,json,sys; time.sleep({sleep}); print(json.dumps({summary!r})); sys.exit({code})"
        return super().launch([sys.executable, "-c", script], env=env, log_path=log_path, cwd=cwd)


GOOD = {
    "feedback export": (0, {"folder": "/snap", "hash": "abc", "counts": {"pairs": 10, "feedback": 12}}, 0),
    "reward train": (0, {"model_version": "2", "gate_passed": True, "eval_accuracy": 0.9, "gate": "better",
                         "eval_pairs": 10, "eval_accuracy_by_source": {
                             "comparison": {"pairs": 4, "eval_accuracy": 1.0},
                             "ranking": {"pairs": 6, "eval_accuracy": 5 / 6}}}, 0),
    "ppo train": (0, {"model_version": "5", "iterations": 2, "reward": 1.0, "kl": 0.1}, 0),
    "ppo evaluate": (0, {"win_rate": 0.7, "passed": True}, 0),
}


@pytest.fixture
def env(tmp_path, monkeypatch):
    settings = Settings(home=tmp_path / "home", pipeline_defaults=json.dumps({"min_pairs": 4}))
    settings.ensure_dirs()
    store.upgrade(settings.store)
    promoted: list[tuple[str, str]] = []
    champions = {"alignloop-policy": "4", "alignloop-reward": "1"}

    class Move:
        def __init__(self, name, previous, current):
            self.name, self.previous, self.current = name, previous, current

    def promote(s, name, version, *, reason, alias="champion"):
        promoted.append((name, version))
        previous, champions[name] = champions[name], version
        return Move(name, previous, version)

    monkeypatch.setattr("pipelines.promotion.promote", promote)
    monkeypatch.setattr(steps_module, "_champion_version", lambda s, name, alias: champions[name])
    monkeypatch.setattr(steps_module, "_untrained_rm", lambda s, version: version == "1")
    monkeypatch.setattr(steps_module, "_served_version",
                        lambda s, service: champions["alignloop-policy" if service == "policy" else "alignloop-reward"])
    return settings, promoted, champions


def make_runner(settings, answers) -> tuple[Runner, CannedLauncher]:
    launcher = CannedLauncher(answers)
    return Runner(settings, RunStore(store.connect(settings.store)), launcher, tracking=False), launcher


def run_once(runner: Runner, **start) -> dict:
    run = runner.start(trigger="operator", **start)
    runner.execute(runner.store.get(run.run_id))
    done = runner.store.get(run.run_id)
    return {"run": done, "steps": {s["name"]: s for s in done.steps}}


def test_a_whole_run_promotes_the_rm_then_the_policy(env):
    settings, promoted, _ = env
    runner, launcher = make_runner(settings, GOOD)
    out = run_once(runner, reason="test")
    assert out["run"].status == "succeeded" and out["run"].active is None
    assert promoted == [("alignloop-reward", "2"), ("alignloop-policy", "5")]
    assert out["run"].promoted_policy_version == "5" and "promoted alignloop-policy v5" in out["run"].outcome
    assert all(s["status"] == "succeeded" for s in out["steps"].values())
    assert out["steps"]["reward_train"]["detail"] == (
        "alignloop-reward v2: held-out accuracy 90.0% on 10 pairs (comparison 100.0%, ranking 83.3%)")
    # PPO and the gate score with the candidate RM, in-process; RM training judges without promoting.
    ppo_argv = next(a for a in launcher.calls if "ppo" in a and "train" in a)
    assert ppo_argv[ppo_argv.index("--reward") + 1] == "inprocess:2"
    assert ppo_argv[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=1" in ppo_argv
    assert "--no-promote" in next(a for a in launcher.calls if "reward" in a)
    assert Path(out["steps"]["ppo"]["log_path"]).read_text().strip().endswith("}")


def test_a_failed_step_fails_the_run_and_moves_no_champion(env):
    settings, promoted, _ = env
    runner, _ = make_runner(settings, {**GOOD, "ppo train": (2, {}, 0)})
    out = run_once(runner)
    assert out["run"].status == "failed" and "ppo: exit status 2" in out["run"].error
    assert out["steps"]["ppo"]["status"] == "failed"
    assert out["steps"]["promote"]["status"] == out["steps"]["serving"]["status"] == "skipped"
    assert promoted == []


def test_the_runners_log_says_when_each_step_starts_and_how_it_ended(env, caplog):
    settings, _, _ = env
    runner, _ = make_runner(settings, {**GOOD, "ppo train": (2, {}, 0)})
    with caplog.at_level(logging.INFO, logger="alignloop.pipeline"):
        out = run_once(runner)
    said = [re.sub(r"after [0-9.]+ s", "after T s", r.getMessage()) for r in caplog.records
            if r.name == "alignloop.pipeline" and r.getMessage().startswith(f"run {out['run'].run_id}: ")]
    expected = []
    for name in ("snapshot", "reward_train", "reward_gate", "ppo"):
        step = out["steps"][name]
        expected += [f"run {out['run'].run_id}: {name} started (its log: {step['log_path']})",
                     f"run {out['run'].run_id}: {name} {step['status']} after T s: {step['detail']}"]
    assert said == expected
    assert [out["steps"][name]["status"] for name in ("snapshot", "ppo")] == ["succeeded", "failed"]


def test_a_refusing_policy_gate_ends_the_run_not_promoted(env):
    settings, promoted, _ = env
    runner, _ = make_runner(settings, {**GOOD, "ppo evaluate": (3, {"reasons": ["win rate 0.40 < 0.5"]}, 0)})
    out = run_once(runner)
    assert out["run"].status == "succeeded"
    assert out["run"].outcome == "not promoted: policy gate: win rate 0.40 < 0.5"
    assert out["steps"]["promote"]["status"] == "skipped" and promoted == []


def test_too_few_pairs_keep_the_rm_and_an_untrained_rm_stops_before_ppo(env):
    settings, promoted, _ = env
    few = {**GOOD, "feedback export": (0, {"folder": "/s", "counts": {"pairs": 2}}, 0)}
    runner, launcher = make_runner(settings, few)
    out = run_once(runner)
    assert out["steps"]["reward_train"]["status"] == "skipped" and "min_pairs=4" in out["steps"]["reward_train"]["detail"]
    # The champion RM is the untrained placeholder (faked as version 1): PPO would climb noise.
    assert out["steps"]["ppo"]["status"] == "skipped" and "untrained" in out["run"].outcome
    assert not any("ppo" in a for a in launcher.calls) and promoted == []


def test_one_run_at_a_time_and_cancel_kills_the_step(env):
    settings, promoted, _ = env
    runner, _ = make_runner(settings, {**GOOD, "ppo train": (0, {"model_version": "5"}, 60)})
    run = runner.start(trigger="operator")
    with pytest.raises(RunInProgress) as busy:
        runner.start(trigger="schedule")
    assert busy.value.run_id == run.run_id
    worker = threading.Thread(target=runner.execute, args=(runner.store.get(run.run_id),))
    worker.start()
    deadline = time.monotonic() + 30
    while runner.store.get(run.run_id).steps[3]["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    started = time.monotonic()
    runner.cancel(run.run_id)
    worker.join(30)
    done = runner.store.get(run.run_id)
    # The step ends on SIGTERM at once; the cancel must not then wait out the 10 s grace for SIGKILL (it did
    # while the unreaped step process counted as alive).
    assert done.status == "cancelled" and time.monotonic() - started < 8
    assert done.steps[3]["status"] == "cancelled" and promoted == []
    with pytest.raises(NotCancellable):
        runner.cancel(run.run_id)
    runner.start(trigger="operator")  # the slot is free again


class ReportingLauncher(CannedLauncher):
    """`reward train` reports its stages through alignloop.progress as the real job does, pausing after each
    long enough for the runner (which saves progress at most every 2 s) to store it."""

    def launch(self, argv, *, env, log_path, cwd):
        if argv[argv.index("alignloop.cli") + 1:][:2] != ["reward", "train"]:
            return super().launch(argv, env=env, log_path=log_path, cwd=cwd)
        script = ("import json, time\n"
                  "from alignloop import progress\n"
                  "stages = progress.Stages(training=3, **{'held-out': 1})\n"
                  "stages.update('training', 5, 10); time.sleep(2.6)\n"
                  "stages.update('held-out', 1, 2); time.sleep(2.6)\n"
                  f"print(json.dumps({GOOD['reward train'][1]!r}))\n")
        return LocalLauncher.launch(self, [sys.executable, "-c", script], env=env, log_path=log_path, cwd=cwd)


def test_a_steps_progress_and_stage_follow_what_its_process_reports(env):
    settings, _, _ = env
    runner = Runner(settings, RunStore(store.connect(settings.store)), ReportingLauncher(GOOD),
                    tracking=False)
    run = runner.start(trigger="operator")
    worker = threading.Thread(target=runner.execute, args=(runner.store.get(run.run_id),))
    worker.start()
    seen = []
    while worker.is_alive():
        step = next(s for s in runner.store.get(run.run_id).steps if s["name"] == "reward_train")
        if step["status"] == "running" and (step["progress"], step["detail"]) not in seen:
            seen.append((step["progress"], step["detail"]))
        time.sleep(0.1)
    worker.join()
    assert runner.store.get(run.run_id).status == "succeeded"
    reported = [s for s in seen if s[1]]
    assert reported == [(pytest.approx(0.375), "training 5/10"), (pytest.approx(0.875), "held-out 1/2")]


@pytest.mark.parametrize(("overrides", "param"), [
    ('{"ppo": {"no_such_flag": 1}}', "config.ppo"),
    ('{"nproc_per_node": 0}', "config.nproc_per_node"),
    ('{"surprise": true}', "config.surprise"),
    ('[1, 2]', "config"),
])
def test_bad_overrides_are_refused_naming_the_key(env, overrides, param):
    settings, _, _ = env
    runner, _ = make_runner(settings, GOOD)
    with pytest.raises(run_config.ConfigError) as err:
        runner.start(trigger="operator", config_json=overrides)
    assert err.value.param == param
    assert runner.store.active() is None


def test_the_schedule_starts_a_run_on_enough_new_feedback(env, monkeypatch):
    settings, _, _ = env
    runner, _ = make_runner(settings.model_copy(update={"pipeline_min_new_feedback": 3}), GOOD)
    monkeypatch.setattr(runner.store, "feedback_since", lambda since: 2)
    assert runner.check_schedule() is None
    monkeypatch.setattr(runner.store, "feedback_since", lambda since: 3)
    run = runner.check_schedule()
    assert run is not None and run.trigger == "feedback"
    assert runner.check_schedule() is None  # one at a time


def test_flags_spell_booleans_as_the_cli_does():
    assert run_config.flags({"iterations": 4, "whiten_advantages": False, "anneal_lr": True}) == [
        "--iterations", "4", "--no-whiten-advantages", "--anneal-lr"]


def test_every_reward_key_the_runner_accepts_is_a_flag_of_reward_train():
    """A key the runner lets through but `reward train` does not know would fail every run at that step."""
    from alignloop.cli import build_parser

    sample = {"backbone": "@champion", "lr": 1e-5, "pointwise_weight": 0.1, "eval_fraction": 0.2,
              "gate_tolerance": 0.01}
    values = {key: sample.get(key, 1) for key in sorted(run_config.REWARD_KEYS)}
    args = build_parser().parse_args(["reward", "train", "--snapshot", "/snap", *run_config.flags(values)])
    assert {key: getattr(args, key) for key in values} == values


def test_recover_marks_a_run_left_running_failed(env):
    settings, _, _ = env
    runner, _ = make_runner(settings, GOOD)
    run = runner.start(trigger="operator")
    runner.store.update(run.run_id, status="running")
    runner.recover()
    assert runner.store.get(run.run_id).status == "failed" and runner.store.active() is None




def test_an_rm_below_the_accuracy_floor_is_refused_even_over_a_placeholder(env):
    settings, promoted, _ = env
    weak = {**GOOD, "reward train": (0, {"model_version": "2", "gate_passed": True, "eval_accuracy": 0.3}, 0)}
    runner, launcher = make_runner(settings, weak)
    out = run_once(runner)
    assert "reward_min_accuracy" in out["steps"]["reward_gate"]["detail"]
    # The champion RM (version 1) is the untrained placeholder: nothing to run PPO against.
    assert out["steps"]["ppo"]["status"] == "skipped" and promoted == []
    assert not any("ppo" in a for a in launcher.calls)


@pytest.mark.parametrize(("policy", "env", "seen"), [
    ("PASSIVE", {}, "PASSIVE"),  # beside the serving engine: idle OpenMP threads sleep at once
    ("PASSIVE", {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),  # the runner's environment chose
    ("PASSIVE", {"GOMP_SPINCOUNT": "1000"}, None),  # ... in GNU OpenMP's own terms
    ("", {}, None),  # ALIGNLOOP_JOB_OMP_WAIT_POLICY="": the runtime's default
])
def test_a_local_step_gets_the_openmp_wait_policy_unless_its_environment_has_one(
        tmp_path: Path, policy: str, env: dict[str, str], seen: str | None) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    script = "import json, os; print(json.dumps({'policy': os.environ.get('OMP_WAIT_POLICY')}))"
    handle = LocalLauncher(policy).launch([sys.executable, "-c", script], env=base | env,
                                          log_path=tmp_path / "step.log", cwd=tmp_path)
    assert handle.process.wait(30) == 0
    handle.poll()
    assert last_json_line(tmp_path / "step.log") == {"policy": seen}


def test_the_runner_launches_locally_with_the_settings_wait_policy(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", job_omp_wait_policy="PASSIVE")
    runner = Runner(settings, RunStore(store.connect(f"sqlite:///{tmp_path / 'runs.db'}")), tracking=False)
    assert runner.launcher.omp_wait_policy == "PASSIVE"
