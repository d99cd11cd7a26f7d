"""Settings for every alignloop process, read from ALIGNLOOP_* variables and an optional TOML file.

The supervisor passes its resolved settings to the processes it starts as environment variables
(`Settings.to_env`), so a service started by hand and one started by `alignloop up` see the same values.
"""

from __future__ import annotations

import hashlib
import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HOME = REPO_ROOT / ".alignloop"
POLICY_MODEL_NAME = "alignloop-policy"
REWARD_MODEL_NAME = "alignloop-reward"


def _config_file() -> Path:
    return Path(os.environ.get("ALIGNLOOP_CONFIG", "alignloop.toml"))


class Settings(BaseSettings):
    """One flat namespace of settings; env var = ALIGNLOOP_ + upper-cased field name."""

    model_config = SettingsConfigDict(env_prefix="ALIGNLOOP_", extra="ignore")

    home: Path = Field(DEFAULT_HOME, description="State: models, logs, MLflow data, credentials.")
    host: str = "127.0.0.1"

    kafka_port: int = 9092
    mlflow_port: int = 5000
    policy_port: int = 50051
    gateway_port: int = 8000
    feedback_port: int = 50052
    materializer_port: int = 9464  # the materializer's /metrics
    reward_port: int = 50053
    reward_metrics_port: int = 9465  # the reward service's /metrics
    policy_metrics_port: int = 9467  # the policy service's /metrics (its own and vLLM's)
    policy_canary_metrics_port: int = 9468  # the canary policy service's
    # Where clients reach each gRPC service; unset: host:port (everything on one machine). In compose or
    # Kubernetes, where `host` is the bind address 0.0.0.0, set these to the services' DNS names.
    policy_address: str | None = None
    policy_canary_address: str | None = None
    feedback_address: str | None = None
    reward_address: str | None = None
    pipeline_address: str | None = None
    # Set to reach an external broker / tracking server instead of the embedded ones.
    kafka_bootstrap_servers: str | None = None
    mlflow_tracking_uri: str | None = None
    # SQLAlchemy URL of the feedback store; unset: SQLite at ALIGNLOOP_HOME/feedback.db.
    # PostgreSQL: postgresql+psycopg://USER@HOST:5432/DB
    store_url: str | None = None
    # Retention (alignloop/store/retention.py), applied by the materializer every `store_prune_interval_s`:
    # everything older than store_retention_days is deleted; completions nobody gave feedback on, older than
    # store_unlabeled_retention_days. 0: kept forever.
    store_retention_days: int = Field(0, ge=0)
    store_unlabeled_retention_days: int = Field(0, ge=0)
    store_prune_interval_s: float = Field(3600.0, gt=0)

    policy_model_name: str = POLICY_MODEL_NAME
    policy_model_alias: str = "champion"
    # How often the policy service checks where the alias points; a new version is loaded in place.
    policy_poll_s: float = 5.0
    # The challenger's policy service (canary traffic): the same service following `policy_canary_alias`.
    policy_canary_port: int = 50055
    policy_canary_alias: str = "challenger"
    # Start without a model and load one when the alias first appears (the canary service: there is
    # usually no challenger). False: a missing alias is an error at start.
    policy_wait_for_alias: bool = False
    # `alignloop up` registers this model when the registry has none: "smollm2" or "tiny".
    bootstrap_model: str = "smollm2"

    # vLLM engine
    max_model_len: int = 2048
    enforce_eager: bool = False
    # The serving engines' weights and activations. "auto": bfloat16 where the hardware computes in it (a
    # CUDA GPU with bf16; a CPU with AVX-512 BF16 or AMX), else float16 on a GPU and float32 on a CPU, where
    # bfloat16 would be emulated (serving_dtype).
    dtype: str = "auto"
    max_num_seqs: int = 64
    # vLLM's stream interval: a streamed answer after its first token goes out in pieces of this many tokens
    # (the last one shorter), not one by one. Each piece is one message through vLLM's front end, gRPC and
    # SSE, so a larger interval costs less CPU per token and streams less smoothly. 1, vLLM's default: each
    # token as it comes. The first token is never held back, so TTFT is the same.
    stream_interval: int = Field(default=1, ge=1)
    # vLLM's scheduling policy. "priority" orders the engine's queue by each request's priority (lower first,
    # then arrival), taken from its tenant (`alignloop keys priority`) or the request's own `priority` field,
    # so that interactive tenants go ahead of batch traffic when the batch is full. "fcfs", vLLM's default,
    # serves in arrival order and ignores priorities.
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    gpu_memory_utilization: float = 0.85
    cpu_kvcache_gib: int = 1
    # vLLM's engine statistics, as `vllm serve` keeps them by default: its Prometheus metrics (vllm:*) on the
    # policy service's /metrics, and a throughput line in its log every VLLM_LOG_STATS_INTERVAL (10 s).
    engine_stats: bool = True
    # An OTLP collector (host:port, or a URL) for distributed traces of each request, gateway -> policy ->
    # vLLM (alignloop/tracing.py); unset: no tracing. vLLM's own spans need engine_stats.
    otlp_traces_endpoint: str | None = None
    # GOMP_SPINCOUNT of a serving engine on CPU: how long an idle OpenMP thread spins before it sleeps. GNU
    # OpenMP's default (300,000 spins, about 3 ms) has the engine worker hold every core between its kernels,
    # so the processes that carry its tokens on (the policy service's gRPC threads, the gateway, the clients)
    # queue for one. 0 (what OMP_WAIT_POLICY=PASSIVE does) served SmolLM2 on 2 cores at 1.02-1.03× vLLM's
    # server, against 0.93× at the default and 0.92× at 1,000 spins (benchmarks/serving.py, README). The engine
    # alone then runs 25% (SmolLM2) to 60% (the tiny model) slower: an engine with cores of its own wants the
    # default back. A negative value leaves the runtime's default.
    cpu_omp_spin_count: int = 0

    # gateway
    max_n: int = 8
    # Admission control: chat requests one gateway holds at once (streams until their end), in all and per
    # API key; past either, a fast 503 / 429 with Retry-After instead of a place at the back of the engine's
    # queue. 0: no cap. The default is eight times the engine's batch (max_num_seqs) per key and sixteen in all.
    max_chats_in_flight: int = 1024
    max_chats_in_flight_per_key: int = 512
    # Rate limits on chat per tenant, a minute, for tenants without their own (`alignloop keys limit`);
    # 0: none.
    # Tokens are prompt plus completion tokens, as OpenAI counts them (services/gateway/rate_limits.py).
    rate_limit_requests_per_minute: int = 0
    rate_limit_tokens_per_minute: int = 0
    # Where the buckets live. Unset: in each gateway process, so N replicas admit N times the limit; a
    # redis:// URL shares them among all replicas (if it cannot be reached, requests are admitted unchecked).
    rate_limit_redis_url: str | None = None
    grpc_timeout_s: float = 600.0
    completion_queue_size: int = 10_000
    # How often the gateway asks the canary policy service what it serves and its share of traffic.
    canary_poll_s: float = 2.0
    # How the gateway spreads chat requests over the policy replicas. "round_robin": in turn. "conversation":
    # by consistent hashing on the tenant, the `user` field and the conversation's opening messages, so that
    # every turn of a conversation reaches the replica whose prefix cache holds its earlier turns.
    policy_routing: Literal["round_robin", "conversation"] = "round_robin"
    # Whose prompts a request's prefix-cache hits may come from. "tenant": its own tenant's only (a salt per
    # tenant: no tenant can time another's prompts); "shared": any tenant's, as in a bare vLLM server.
    prefix_cache_scope: Literal["tenant", "shared"] = "tenant"
    # Where operators' browsers reach MLflow's UI, for the console's links to runs; unset: the tracking URI,
    # right when everything runs on one machine, an internal address in a cluster.
    mlflow_ui_url: str | None = None

    # feedback
    feedback_batch_max: int = 1000
    feedback_max_body_bytes: int = 1 << 20
    feedback_max_ranking: int = 16
    feedback_max_text_chars: int = 20_000
    # A completion record reaches the store a few ms after its answer; feedback on it may come sooner.
    feedback_completion_wait_s: float = 5.0
    feedback_consumer_group: str = "alignloop-store"
    kafka_session_timeout_ms: int = 10_000

    # reward model and service
    reward_model_name: str = REWARD_MODEL_NAME
    reward_model_alias: str = "champion"
    reward_device: str = "auto"  # "auto": cuda when available, else cpu
    reward_max_batch: int = 64  # pairs per forward pass, across concurrent requests
    reward_max_wait_ms: float = 2.0  # how long a forward pass waits to fill up
    reward_max_items: int = 256  # pairs per Score request
    reward_poll_s: float = 5.0  # how often the service checks the registry for a new champion
    # torch threads of the reward service's forward passes on a CPU; 0: torch's default (one per core). On a
    # machine shared with the vLLM engine, 1 avoids threads that spin waiting for a core the engine holds.
    reward_threads: int = 0
    # The gate: a new RM becomes champion only if its held-out accuracy >= the champion's - this.
    reward_gate_tolerance: float = 0.0

    # pipeline runner (services/pipeline): retraining runs, one at a time
    pipeline_port: int = 50054
    pipeline_metrics_port: int = 9466  # the runner's /metrics
    pipeline_interval_s: float = 0.0  # start a run this long after the last one began; 0: no interval schedule
    # start a run once this many feedback events arrived since the last run's snapshot; 0: no such trigger
    pipeline_min_new_feedback: int = 0
    pipeline_check_s: float = 10.0  # how often the schedule is checked
    # Step settings every run starts from, a JSON object (keys in services/pipeline/config.py), e.g.
    # '{"ppo": {"iterations": 4}, "nproc_per_node": 2}'; a run's own overrides go on top.
    pipeline_defaults: str = ""
    # OMP_WAIT_POLICY of the steps the runner starts on its own machine (RM training, PPO, evaluation), unless
    # the runner's environment sets an OpenMP wait policy; empty: the runtime's default. At GNU OpenMP's
    # default a job's idle threads spin about 3 ms after every parallel region, holding cores the serving
    # engine beside it waits for; PASSIVE lets them sleep at once, a trade: SmolLM2 served 1.095x the tokens/s
    # beside a passive PPO job (33.9 against 31.0; alone 82.1) while the job took 1.17x as long (two rounds
    # that disagreed; benchmarks/trainer_beside_serving.py).
    job_omp_wait_policy: str = ""

    # readiness waits of the supervisor, per component
    start_timeout_s: float = 300.0
    # How long a stopping service (SIGTERM) lets the calls in flight finish: a stream gets this long to end
    # before it is cut. New calls are refused from the start, and the gateway's channels retry those on
    # another replica (alignloop/grpc_channels.py). In Kubernetes, terminationGracePeriodSeconds must cover
    # it, plus the preStop pause.
    drain_s: float = 10.0
    # How long a gRPC server keeps a client's connection before asking it to reconnect (calls in flight
    # finish first). Clients resolve the service's name again then: a replica added since is called within
    # about this long. 0: connections are kept for good.
    grpc_max_connection_age_s: float = 300.0

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments > environment > TOML file.
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=_config_file()),
        )

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("bootstrap_model")
    @classmethod
    def _known_bootstrap(cls, v: str) -> str:
        if v not in ("smollm2", "tiny"):
            raise ValueError("bootstrap_model must be 'smollm2' or 'tiny'")
        return v

    # ---- derived locations -------------------------------------------------------------------------
    @cached_property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @cached_property
    def run_dir(self) -> Path:
        return self.home / "run"

    @cached_property
    def models_dir(self) -> Path:
        return self.home / "models"

    @cached_property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @cached_property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @cached_property
    def credentials_path(self) -> Path:
        return self.home / "credentials.json"

    @property
    def kafka_bootstrap(self) -> str:
        return self.kafka_bootstrap_servers or f"{self.host}:{self.kafka_port}"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"http://{self.host}:{self.mlflow_port}"

    @property
    def policy_target(self) -> str:
        return self.policy_address or f"{self.host}:{self.policy_port}"

    @property
    def policy_canary_target(self) -> str:
        return self.policy_canary_address or f"{self.host}:{self.policy_canary_port}"

    @property
    def feedback_target(self) -> str:
        return self.feedback_address or f"{self.host}:{self.feedback_port}"

    @property
    def reward_target(self) -> str:
        return self.reward_address or f"{self.host}:{self.reward_port}"

    @property
    def pipeline_target(self) -> str:
        return self.pipeline_address or f"{self.host}:{self.pipeline_port}"

    @property
    def store(self) -> str:
        """The feedback store's SQLAlchemy URL."""
        return self.store_url or f"sqlite:///{self.home / 'feedback.db'}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.gateway_port}"

    @property
    def embedded_kafka(self) -> bool:
        return self.kafka_bootstrap_servers is None

    @property
    def embedded_mlflow(self) -> bool:
        return self.mlflow_tracking_uri is None

    def to_env(self) -> dict[str, str]:
        """The settings as ALIGNLOOP_* variables, for child processes."""
        env = {}
        for name, value in self.model_dump().items():
            if value is not None:
                env[f"ALIGNLOOP_{name.upper()}"] = str(value)
        return env

    def ensure_dirs(self) -> None:
        for d in (self.home, self.logs_dir, self.run_dir, self.models_dir, self.cache_dir, self.mlflow_dir):
            d.mkdir(parents=True, exist_ok=True)


def serving_dtype(setting: str) -> str:
    """The dtype a serving engine is built with: `setting`, unless it is "auto" (see Settings.dtype).

    A CPU without AVX-512 BF16 or AMX has no bfloat16 arithmetic: torch converts every operand, and a matmul
    of SmolLM2's shape took 56× as long in bfloat16 as in float32 on an AVX2 machine (2026-12-06).
    """
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return "bfloat16"
    return "float32"


def vllm_serving_environment(settings: Settings) -> dict[str, str]:
    """`vllm_cpu_environment` for an engine that serves requests beside other busy processes (the policy
    service, and the serving benchmark's engines): its idle OpenMP threads soon sleep (`cpu_omp_spin_count`).
    Trainers keep the default: their engines run in the trainer's own process, whose training ops share the
    OpenMP runtime (a PPO iteration on SmolLM2 took 1.07-1.24× as long at spin count 0; README)."""
    env = vllm_cpu_environment(settings)
    if settings.cpu_omp_spin_count >= 0:
        env["GOMP_SPINCOUNT"] = str(settings.cpu_omp_spin_count)
    return env


def vllm_cpu_environment(settings: Settings) -> dict[str, str]:
    """Variables vLLM needs on this platform (see ../shared/PLATFORM.md); harmless on CUDA machines.

    Creates the folders they point to: vLLM expects them to exist.
    """
    cache = settings.cache_dir
    for sub in ("vllm", "inductor", "tmp"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(settings.cpu_kvcache_gib),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        # vLLM 0.32's AOT compile cache is written on CPU but cannot be read back ("'function' object has no
        # attribute 'finalize_loading'"), so every start compiled the model afresh. Without it vLLM compiles
        # through torch's own cache (TORCHINDUCTOR_CACHE_DIR), which later starts do read: SmolLM2's engine
        # warmed up in 17 s instead of 73-86 s (benchmarks/README, "Engine starts").
        "VLLM_USE_AOT_COMPILE": "0",
        "VLLM_RPC_BASE_PATH": str(rpc_dir(cache)),
        "TMPDIR": str(cache / "tmp"),
    }


# A Unix socket's path holds at most 107 bytes (sockaddr_un.sun_path), and vLLM names its sockets
# `<VLLM_RPC_BASE_PATH>/<uuid4>`: 37 bytes after the folder.
_SOCKET_PATH_MAX = 107
_RPC_NAME_LEN = 37


def rpc_dir(cache: Path) -> Path:
    """The folder, made if need be, where vLLM's engines put their IPC sockets: `cache/rpc`, unless that is
    too long a path for a socket (a deep checkout or test folder), then a private folder in /tmp, one per
    cache and user. Not TMPDIR: this same environment points TMPDIR into the cache."""
    preferred = cache / "rpc"
    if len(os.fsencode(preferred.resolve())) + _RPC_NAME_LEN <= _SOCKET_PATH_MAX:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred
    digest = hashlib.sha256(os.fsencode(cache.resolve())).hexdigest()[:16]
    short = Path("/tmp") / f"alignloop-rpc-{os.getuid()}-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    owner = short.stat()
    if owner.st_uid != os.getuid() or owner.st_mode & 0o077:
        # A folder in the shared /tmp that someone else made (or opened) could carry their sockets.
        raise RuntimeError(f"{short} is not this user's own private folder: remove it, or use a shorter "
                           "ALIGNLOOP_HOME")
    return short
