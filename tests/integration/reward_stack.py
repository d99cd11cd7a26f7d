"""A reward-only stack for tests and benchmarks: an MLflow server and the reward service, each a real process
on free ports, with a placeholder reward model registered as alignloop-reward@champion (no Kafka, no vLLM)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx

from alignloop import components
from alignloop.config import Settings
from alignloop.registry import ModelVersionRef, fetch_version, resolve_alias
from alignloop.v1 import reward_pb2 as pb
from alignloop.v1 import reward_pb2_grpc as pb_grpc
from tests.conftest import REPO, free_port


def reward_settings(home: Path, **overrides) -> Settings:
    values = dict(
        home=home,
        mlflow_port=free_port(),
        reward_port=free_port(),
        reward_metrics_port=free_port(),
        reward_poll_s=0.5,
    )
    return Settings(**{**values, **overrides})


@dataclass
class RewardStack:
    settings: Settings
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # ---- processes -------------------------------------------------------------------------------------
    def start(self, name: str, timeout: float = 180) -> None:
        c = {"mlflow": components.mlflow_server, "reward": components.reward}[name](self.settings)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("ALIGNLOOP_")},
               **self.settings.to_env(), **c.env, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "ALIGNLOOP_CONFIG": str(self.settings.home / "no-such-config.toml")}
        log = open(self.settings.logs_dir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(c.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode}:\n{self.log(name)}")
            if c.probe():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready after {timeout} s:\n{self.log(name)}")

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        p = self.procs.pop(name)
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            return p.wait(10)

    def log(self, name: str) -> str:
        path = self.settings.logs_dir / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def up(self, *, tiny: bool = True) -> RewardStack:
        from pipelines.models_init import init_reward_model

        self.settings.ensure_dirs()
        self.start("mlflow")
        init_reward_model(self.settings, tiny=tiny)
        self.start("reward")
        return self

    def down(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    # ---- registry ---------------------------------------------------------------------------------------
    def register(self, folder: Path, *, aliases: tuple[str, ...] = ()) -> ModelVersionRef:
        """A new version of the reward model from `folder`; `aliases` are moved to it."""
        from pipelines.models_init import register_reward_model

        return register_reward_model(self.settings, folder, description="test", tags={"kind": "test"},
                                     aliases=aliases)

    def set_alias(self, version: str, alias: str = "champion") -> None:
        from mlflow import MlflowClient

        uri = self.settings.tracking_uri
        MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
            self.settings.reward_model_name, alias, version)

    def in_process(self, version: str):
        """(model, tokenizer) of a registered version, loaded here from its own download."""
        from alignloop.reward_model import RewardModel

        ref = ModelVersionRef(self.settings.reward_model_name, version, None, "")
        folder = fetch_version(self.settings.tracking_uri, ref, self.settings.home / "in-process")
        return RewardModel.load(folder)

    def champion(self) -> ModelVersionRef:
        return resolve_alias(self.settings.tracking_uri, self.settings.reward_model_name, "champion")

    # ---- the service ------------------------------------------------------------------------------------
    @property
    def target(self) -> str:
        return self.settings.reward_target

    def stub(self, channel: grpc.Channel) -> pb_grpc.RewardServiceStub:
        return pb_grpc.RewardServiceStub(channel)

    def info(self) -> pb.GetRewardInfoResponse:
        with grpc.insecure_channel(self.target) as channel:
            return self.stub(channel).GetInfo(pb.GetRewardInfoRequest(), timeout=10)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample on /metrics as {(name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"http://{self.settings.host}:{self.settings.reward_metrics_port}/metrics",
                         timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}
