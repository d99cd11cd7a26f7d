"""pipelines.models_init: the tiny base model is a usable transformers folder; init_models registers once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipelines.models_init import build_tiny_policy, init_models  # noqa: E402

CHATML = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("tiny") / "model", max_position_embeddings=512)


def test_tiny_folder_has_the_files_loaders_read(tiny_folder: Path) -> None:
    names = {p.name for p in tiny_folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert "chat_template" in json.loads((tiny_folder / "tokenizer_config.json").read_text())


def test_tiny_tokenizer_round_trips_any_text(tiny_folder: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    for text in ["Hello, world!", "  two spaces\tand a tab\n", "naïve café 東京 🙂", "x = [1, 2, 3]"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # Special tokens are single ids, so the chat markup is cheap and stop detection works.
    assert len(tok.encode("<|im_end|>", add_special_tokens=False)) == 1


def test_tiny_chat_template_is_chatml(tiny_folder: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == CHATML
    assert tok.apply_chat_template(messages, tokenize=False) == CHATML.removesuffix("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"


def test_tiny_model_matches_its_tokenizer(tiny_folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    config = model.config
    assert config.vocab_size >= len(tok)
    assert config.max_position_embeddings == 512
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert GenerationConfig.from_pretrained(tiny_folder).eos_token_id == tok.eos_token_id
    # vLLM's CPU attention refuses head sizes below 32.
    assert config.head_dim >= 32

    ids = tok(CHATML, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()
    # Whatever the random model emits must decode.
    assert isinstance(tok.decode(logits[0].argmax(-1).tolist()), str)


def test_tiny_build_is_reproducible(tiny_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    again = build_tiny_policy(tmp_path / "again", max_position_embeddings=512)
    a, b = load_file(tiny_folder / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (tiny_folder / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


# ---- registry -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server",
         "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
         "--artifacts-destination", str(tmp_path / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # else ~2 GB of job workers
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "mlflow.log", "wb"),
        start_new_session=True,  # its own process group, so its uvicorn workers stop with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "mlflow.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "MLflow server not healthy after 60 s"
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.integration
def test_init_models_registers_once(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow.artifacts
    from mlflow import MlflowClient

    from alignloop.config import Settings

    settings = Settings(home=tmp_path / "home", mlflow_tracking_uri=mlflow_server, max_model_len=256)
    ref = init_models(settings, tiny=True)
    assert (ref.name, ref.version) == (settings.policy_model_name, "1")
    assert ref.source == f"runs:/{ref.run_id}/model"

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    mv = client.get_model_version(ref.name, ref.version)
    assert mv.status == "READY"
    assert set(mv.aliases) == {"champion", "reference"}
    assert mv.tags["source"] == "tiny" and mv.tags["kind"] == "base"
    assert not [p for p in settings.cache_dir.iterdir() if p.name.startswith("policy-build-")]

    # MLflow 3.17 resolves models:/NAME@ALIAS against the process-wide tracking/registry URI (by default
    # sqlite:///mlflow.db in the working directory), whatever tracking_uri download_artifacts is given.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    got = Path(mlflow.artifacts.download_artifacts(
        f"models:/{ref.name}@champion", tracking_uri=mlflow_server, dst_path=str(tmp_path / "dl")))
    assert (got / "config.json").exists() and (got / "tokenizer_config.json").exists()

    # Second call: nothing new is registered.
    assert init_models(settings, tiny=True) == ref
    assert [v.version for v in client.search_model_versions(f"name='{ref.name}'")] == ["1"]


# ---- the placeholder reward model -------------------------------------------------------------------------
def test_tiny_reward_model_loads_and_is_reproducible(tmp_path: Path) -> None:
    from alignloop.reward_model import RewardModel, render
    from pipelines.models_init import build_tiny_reward_model

    hi = [{"role": "user", "content": "hi"}]
    texts = [render(hi, "hello"), render(hi, "bye")]
    scores = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        folder = build_tiny_reward_model(tmp_path / name, seed=seed)
        assert {p.name for p in folder.iterdir()} >= {"backbone", "head.safetensors", "reward_config.json"}
        model, tokenizer = RewardModel.load(folder)
        assert model.config.pooling == "mean"
        assert sum(p.numel() for p in model.parameters()) < 200_000
        scores[name] = model.score(tokenizer, texts)
    assert scores["a"] == scores["b"]
    assert scores["a"] != scores["c"]
    assert scores["a"][0] != scores["a"][1]
