"""Settings, credentials, the supervisor's port check and the policy's request preparation."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from alignloop import credentials
from alignloop.config import Settings
from alignloop.supervisor import free_ports, group_alive, pid_alive, port_in_use


def test_settings_precedence_env_over_toml(tmp_path, monkeypatch):
    config = tmp_path / "alignloop.toml"
    config.write_text('gateway_port = 9100\nmax_n = 3\nhome = "%s"\n' % (tmp_path / "state"))
    monkeypatch.setenv("ALIGNLOOP_CONFIG", str(config))
    monkeypatch.setenv("ALIGNLOOP_MAX_N", "5")
    s = Settings()
    assert s.gateway_port == 9100 and s.max_n == 5
    assert s.home == (tmp_path / "state").resolve()
    assert s.gateway_url == "http://127.0.0.1:9100"
    # What children receive reproduces the same settings.
    env = s.to_env()
    assert env["ALIGNLOOP_GATEWAY_PORT"] == "9100" and env["ALIGNLOOP_MAX_N"] == "5"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("ALIGNLOOP_CONFIG", str(tmp_path / "none.toml"))
    assert Settings() == s


def test_external_services_replace_the_embedded_ones(monkeypatch):
    monkeypatch.setenv("ALIGNLOOP_KAFKA_BOOTSTRAP_SERVERS", "kafka-0:9092,kafka-1:9092")
    monkeypatch.setenv("ALIGNLOOP_MLFLOW_TRACKING_URI", "http://mlflow:5000")
    s = Settings()
    assert not s.embedded_kafka and s.kafka_bootstrap == "kafka-0:9092,kafka-1:9092"
    assert not s.embedded_mlflow and s.tracking_uri == "http://mlflow:5000"


def test_vllms_sockets_stay_under_the_unix_socket_path_limit_however_deep_the_home(tmp_path: Path):
    from alignloop.config import vllm_cpu_environment

    short = Path(tempfile.mkdtemp(prefix="al-", dir="/tmp"))  # pytest's own folders are too deep already
    shallow = Settings(home=short / "h")
    deep = Settings(home=tmp_path / ("d" * 60) / "home")
    other = Settings(home=tmp_path / ("e" * 60) / "home")
    made: list[Path] = []  # the /tmp folders this test makes, removed however it ends
    try:
        assert Path(vllm_cpu_environment(shallow)["VLLM_RPC_BASE_PATH"]) == shallow.cache_dir / "rpc"
        rpc = Path(vllm_cpu_environment(deep)["VLLM_RPC_BASE_PATH"])
        made.append(rpc)
        assert rpc != deep.cache_dir / "rpc" and rpc.is_dir() and stat.S_IMODE(rpc.stat().st_mode) == 0o700
        # vLLM's socket names: the folder, a slash and a uuid4; a Unix socket's path holds 107 bytes.
        assert len(str(rpc)) + 1 + 36 <= 107
        assert rpc == Path(vllm_cpu_environment(deep)["VLLM_RPC_BASE_PATH"])  # the same folder each time
        other_rpc = Path(vllm_cpu_environment(other)["VLLM_RPC_BASE_PATH"])
        made.append(other_rpc)
        assert other_rpc != rpc  # and one per home
        with socket.socket(socket.AF_UNIX) as sock:  # a socket of vLLM's name length binds there
            sock.bind(str(rpc / ("0" * 36)))
        (rpc / ("0" * 36)).unlink()
        rpc.chmod(0o755)  # opened to others (as someone else's folder would be): refused, not used
        with pytest.raises(RuntimeError, match="private folder"):
            vllm_cpu_environment(deep)
    finally:
        shutil.rmtree(short)
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def test_serving_engines_let_idle_openmp_threads_sleep_soon_and_trainers_do_not(tmp_path: Path):
    from alignloop.components import policy
    from alignloop.config import vllm_cpu_environment, vllm_serving_environment

    s = Settings(home=tmp_path / "home")
    assert vllm_serving_environment(s)["GOMP_SPINCOUNT"] == "0"
    assert "GOMP_SPINCOUNT" not in vllm_cpu_environment(s)  # in-process trainer engines keep the default
    assert policy(s).env["GOMP_SPINCOUNT"] == "0"
    assert policy(s.model_copy(update={"cpu_omp_spin_count": 1000})).env["GOMP_SPINCOUNT"] == "1000"
    assert "GOMP_SPINCOUNT" not in policy(s.model_copy(update={"cpu_omp_spin_count": -1})).env


def test_credentials_created_0600_then_reused(tmp_path: Path):
    path = tmp_path / "home" / "credentials.json"
    first = credentials.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.app_key != first.operator_key and len(first.app_key) > 40
    assert credentials.load_or_create(path) == first
    assert credentials.key_hash(first.app_key) != credentials.key_hash(first.operator_key)


def test_free_ports_are_distinct_and_free():
    ports = free_ports(64)
    assert len(set(ports)) == 64
    assert not any(port_in_use("127.0.0.1", p) for p in ports)


def test_test_stacks_take_ports_below_the_ephemeral_range_from_their_workers_own_slice():
    from tests import conftest

    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    with socket.socket() as held:
        held.bind(("127.0.0.1", conftest._next_port))  # the port next in turn is taken: it is passed over
        held.listen()
        ports = conftest.free_ports(3)
        assert held.getsockname()[1] not in ports
    assert len(set(ports)) == 3 and not any(port_in_use("127.0.0.1", p) for p in ports)
    first = conftest._PORTS_LOW + conftest._WORKER * conftest._SLICE
    assert all(first <= p < first + conftest._SLICE and p < ephemeral_low for p in ports)
    assert conftest.free_port() not in ports  # not handed out again before the slice wraps around


def test_port_in_use_sees_listeners_only():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.listen()
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)


def test_pid_alive_counts_an_unreaped_child_as_gone():
    # `alignloop down` polls the supervisor's pid; under a parent that has not reaped it yet (a test, a
    # process manager) the exited supervisor is a zombie, which must not look alive for the whole timeout.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    try:
        assert pid_alive(child.pid)
        deadline = time.monotonic() + 30
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.05)
        assert not pid_alive(child.pid)
    finally:
        child.wait()
    assert not pid_alive(child.pid)


def test_a_group_counts_as_gone_when_only_unreaped_processes_are_left():
    # A group leader that exited but is not reaped yet, with a child of its own still running: the group is
    # alive until that child ends, and then gone although the leader is still a zombie.
    script = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1.5)']); time.sleep(0.3)")
    leader = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while psutil.Process(leader.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the leader never exited"
            time.sleep(0.05)
        assert group_alive(leader.pid), "its child still runs"
        while group_alive(leader.pid):
            assert time.monotonic() < deadline, "the group never counted as gone"
            time.sleep(0.05)
        assert psutil.Process(leader.pid).status() == psutil.STATUS_ZOMBIE  # gone, yet not reaped
    finally:
        leader.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)


# ---- the policy service's request preparation, against a real (tiny) tokenizer ---------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from pipelines.models_init import build_tiny_policy

    folder = build_tiny_policy(tmp_path_factory.mktemp("tiny") / "m", max_position_embeddings=64)
    return AutoTokenizer.from_pretrained(str(folder))


def _req(**sampling):
    from alignloop.v1 import policy_pb2 as pb

    return pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]),
                              sampling=pb.SamplingParams(**sampling))


def test_freezing_vllms_environment_keeps_the_values_read_then(monkeypatch):
    """After build_engine, vLLM reads its variables from a cache: a later change of the environment is not seen
    (which is why nothing may change them after the engine is built)."""
    from vllm import envs

    from services.policy.engine import freeze_vllm_environment

    monkeypatch.setenv("VLLM_MAX_N_SEQUENCES", "7")
    try:
        assert envs.VLLM_MAX_N_SEQUENCES == 7  # read each time before
        freeze_vllm_environment()
        monkeypatch.setenv("VLLM_MAX_N_SEQUENCES", "9")
        assert envs.VLLM_MAX_N_SEQUENCES == 7
    finally:
        envs.disable_envs_cache()  # other tests in this process set vLLM's variables
    assert envs.VLLM_MAX_N_SEQUENCES == 9


def test_prepare_defaults_max_tokens_to_the_rest_of_the_context(tokenizer):
    from services.policy.engine import prepare

    p = prepare(_req(), tokenizer, 64, stream=True)
    assert p.sampling_params.max_tokens == 64 - len(p.prompt_token_ids)
    assert p.sampling_params.n == 1 and p.sampling_params.logprobs is None


@pytest.mark.parametrize(
    ("sampling", "param"),
    [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 64}, "max_tokens"), ({"temperature": -1}, "temperature"),
     ({"top_p": 1.5}, "top_p"), ({"presence_penalty": 2.5}, "presence_penalty"),
     ({"frequency_penalty": -3}, "frequency_penalty"), ({"frequency_penalty": float("nan")}, "frequency_penalty"),
     ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": float("inf")}, "repetition_penalty"),
     ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"logit_bias": {10**6: 1.0}}, "logit_bias"),
     ({"logit_bias": {-1: 1.0}}, "logit_bias"), ({"logit_bias": {3: 101.0}}, "logit_bias"),
     ({"logit_bias": dict.fromkeys(range(301), 1.0)}, "logit_bias")],
)
def test_prepare_names_the_bad_field(tokenizer, sampling, param):
    from services.policy.engine import InvalidRequest, prepare

    with pytest.raises(InvalidRequest) as e:
        prepare(_req(**sampling), tokenizer, 64, stream=False)
    assert e.value.param == param


def test_prepare_passes_penalties_top_k_min_p_and_logit_bias_and_leaves_vllms_defaults_when_unset(tokenizer):
    from services.policy.engine import prepare

    unset = prepare(_req(), tokenizer, 64, stream=False).sampling_params
    assert (unset.presence_penalty, unset.frequency_penalty, unset.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (unset.top_k, unset.min_p, unset.logit_bias) == (0, 0.0, None)
    last = len(tokenizer) - 1
    p = prepare(_req(presence_penalty=0.5, frequency_penalty=-2, repetition_penalty=1.25, top_k=5, min_p=0.25,
                     logit_bias={0: -100.0, last: 100.0}), tokenizer, 64, stream=False).sampling_params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -2.0, 1.25)
    assert (p.top_k, p.min_p, p.logit_bias) == (5, 0.25, {0: -100.0, last: 100.0})
    assert prepare(_req(top_k=-1), tokenizer, 64, stream=False).sampling_params.top_k == 0  # no limit


def test_prepare_builds_each_structured_output_constraint(tokenizer):
    from alignloop.v1 import policy_pb2 as pb
    from services.policy.engine import prepare

    def constraint(**kind):
        return prepare(_req(structured_output=pb.StructuredOutput(**kind)), tokenizer, 64,
                       stream=False).sampling_params.structured_outputs

    assert prepare(_req(), tokenizer, 64, stream=False).sampling_params.structured_outputs is None
    assert constraint(json_object=True).json_object is True
    assert constraint(json_schema='{"type": "boolean"}').json == {"type": "boolean"}
    assert constraint(regex="[0-9]{3}").regex == "[0-9]{3}"
    assert constraint(choice=pb.Choices(values=["yes", "no"])).choice == ["yes", "no"]


@pytest.mark.parametrize("kind", [{"json_object": False}, {"json_schema": "{not json"}, {"json_schema": "[1]"},
                                  {"choice": {}}])
def test_prepare_refuses_a_malformed_constraint_naming_it(tokenizer, kind):
    from alignloop.v1 import policy_pb2 as pb
    from services.policy.engine import InvalidRequest, prepare

    with pytest.raises(InvalidRequest) as e:
        prepare(_req(structured_output=pb.StructuredOutput(**kind)), tokenizer, 64, stream=False)
    assert e.value.param == "structured_output"


def test_prepare_turns_vllms_own_refusals_into_invalid_requests(tokenizer):
    from alignloop.v1 import policy_pb2 as pb
    from vllm.exceptions import VLLMValidationError

    from services.policy.engine import InvalidRequest, prepare

    def refuse(parameter):
        def verify(params):
            raise VLLMValidationError("refused by the engine", parameter=parameter)
        return verify

    with pytest.raises(InvalidRequest) as e:
        prepare(_req(), tokenizer, 64, stream=False, verify=refuse("logit_bias"))
    assert (e.value.param, str(e.value)) == ("logit_bias", "refused by the engine")
    with pytest.raises(InvalidRequest) as e:  # no parameter named: the constraint is the likely culprit
        prepare(_req(structured_output=pb.StructuredOutput(regex="(")), tokenizer, 64, stream=False,
                verify=refuse(None))
    assert e.value.param == "structured_output"
    checked = []
    prepare(_req(), tokenizer, 64, stream=False, verify=checked.append)
    assert len(checked) == 1 and checked[0].max_tokens > 0  # the SamplingParams the engine will get


def test_prepare_rejects_a_prompt_longer_than_the_context(tokenizer):
    from alignloop.v1 import policy_pb2 as pb
    from services.policy.engine import InvalidRequest, prepare

    with pytest.raises(InvalidRequest) as e:
        prepare(pb.GenerateRequest(prompt="word " * 200), tokenizer, 64, stream=False)
    assert e.value.param == "prompt" and "context" in str(e.value)


@pytest.mark.parametrize(("cuda", "cuda_bf16", "avx512_bf16", "amx", "expected"), [
    (False, False, False, False, "float32"),  # AVX2: bfloat16 would be emulated
    (False, False, True, False, "bfloat16"),
    (False, False, False, True, "bfloat16"),
    (True, True, False, False, "bfloat16"),
    (True, False, True, True, "float16"),  # a GPU without bf16: what the host CPU has does not count
])
def test_auto_serves_in_bfloat16_only_where_the_hardware_computes_in_it(monkeypatch, cuda, cuda_bf16, avx512_bf16,
                                                                       amx, expected):
    import torch

    from alignloop.config import serving_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert serving_dtype("auto") == expected
    assert serving_dtype("float16") == "float16" and serving_dtype("bfloat16") == "bfloat16"
