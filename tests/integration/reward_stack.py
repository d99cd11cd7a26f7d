"""A reward-only stack for tests and benchmarks: an MLflow server and the reward service, each a real process
on free ports, with a placeholder reward model registered as alignloop-reward@champion (no Kafka, no vLLM)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from alignloop import components
from alignloop.config import Settings
from alignloop.registry import ModelVersionRef, fetch_version, resolve_alias
from alignloop.v1 import reward_pb2 as pb
from alignloop.v1 import reward_pb2_grpc as pb_grpc
from tests.conftest import free_port
from tests.integration.processes import ComponentProcesses


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
class RewardStack(ComponentProcesses):
    def component(self, name: str) -> components.Component:
        return {"mlflow": components.mlflow_server, "reward": components.reward}[name](self.settings)

    def start(self, name: str, timeout: float = 180) -> None:  # MLflow and a model load take longer
        super().start(name, timeout)

    def up(self, *, tiny: bool = True) -> RewardStack:
        from pipelines.models_init import init_reward_model

        self.settings.ensure_dirs()
        self.start("mlflow")
        init_reward_model(self.settings, tiny=tiny)
        self.start("reward")
        return self

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
