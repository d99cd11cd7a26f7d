"""The trainers' CUDA paths, on the tiny random models: skipped where torch sees no GPU (CI has none).

PPO runs here with transformers `generate` as the rollout engine (`rollout_engine="hf"`), so these tests need
no vLLM build for CUDA; the vLLM rollouts are covered on the CPU by tests/integration/test_ppo.py. The bars
are that file's: the reward climbs, and a larger beta keeps the policy nearer the reference. The reward
model's CUDA path forwards in larger length-sorted chunks (Args.forward_tokens: 16384 on CUDA); it must give
what one padded forward gives, learn toy preferences, and score as the CPU does.

    python -m pytest tests/gpu -q
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from alignloop.config import Settings
from alignloop.reward_model import RewardModel, render
from pipelines.models_init import build_tiny_policy
from pipelines.ppo.rewards import FunctionReward
from pipelines.ppo.train import Inputs, train
from pipelines.reward.datasets import PreferenceGroup, RewardData
from pipelines.reward.train import (TokenTable, chunks_by_length, forward_rows, load_start, pair_accuracy,
                                    run, score_texts)
from tests.integration.test_ppo import PROMPTS, REWARD, fast_args, window
from tests.reward_toys import QUALITY, TOPICS, answer, build_tiny_bert, conversation
from tests.reward_toys import fast_args as fast_rm_args

# Another device by the environment (cuda:1; or cpu, to check these tests on a machine without a GPU).
CUDA = torch.device(os.environ.get("ALIGNLOOP_GPU_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def toy_preferences(n: int, seed: int) -> list[PreferenceGroup]:
    """n comparisons of a "good" answer over a "bad" one to a random question."""
    rng = random.Random(seed)
    groups = []
    for i in range(n):
        question = conversation(rng.choice(TOPICS))
        groups.append(PreferenceGroup(f"g{seed}-{i}", (render(question, answer(rng, "good")),
                                                      render(question, answer(rng, "bad"))), ((0, 1),)))
    return groups


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny", max_position_embeddings=512)


def ppo_on_cuda(policy: Path, out: Path, **overrides) -> list[dict]:
    args = fast_args(rollout_engine="hf", device=str(CUDA), **overrides)
    return train(Inputs(policy, policy, PROMPTS, FunctionReward(REWARD)), args, out).history


def test_ppo_on_cuda_raises_the_reward_and_a_larger_beta_stays_closer(tiny_policy: Path, tmp_path: Path):
    loose = ppo_on_cuda(tiny_policy, tmp_path / "loose", beta=0.01)
    tight = ppo_on_cuda(tiny_policy, tmp_path / "tight", beta=1.0)
    before, after = window(loose, "reward", True), window(loose, "reward", False)
    assert after > before + 0.8, f"mean reward {before:.2f} -> {after:.2f}"
    kl_loose, kl_tight = window(loose, "kl", False), window(tight, "kl", False)
    assert kl_tight < 0.5 * kl_loose, (kl_tight, kl_loose)
    # The sampler is the trained policy itself: its log-probs are the trainer's up to kernel differences.
    assert max(r["logprob_gap"] for r in loose) < 1e-3
    assert (tmp_path / "loose" / "final" / "model.safetensors").exists()


def test_rloo_on_cuda_raises_the_reward_without_a_critic(tiny_policy: Path, tmp_path: Path):
    history = ppo_on_cuda(tiny_policy, tmp_path / "rloo", advantage_estimator="rloo")
    before, after = window(history, "reward", True), window(history, "reward", False)
    assert after > before + 0.8, f"mean reward {before:.2f} -> {after:.2f}"


def test_reward_chunks_on_cuda_give_the_rewards_of_one_padded_forward(backbone: Path):
    rng = random.Random(2)
    texts = [render(conversation(rng.choice(TOPICS)), answer(rng, rng.choice(QUALITY)) * rng.randint(1, 4))
             for _ in range(40)]
    model, tokenizer = load_start(backbone, fast_rm_args(backbone, device=str(CUDA)), CUDA)
    table = TokenTable(tokenizer, texts, 64)
    rows = list(range(len(texts)))
    assert len(chunks_by_length(rows, table, 256)) > 3
    chunked = forward_rows(model, rows, table, 256, CUDA)
    whole = forward_rows(model, rows, table, 10**9, CUDA)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


def test_reward_training_on_cuda_learns_and_scores_as_the_cpu_does(tmp_path: Path, backbone: Path):
    data = RewardData(toy_preferences(240, seed=0), toy_preferences(60, seed=1), [], name="toy",
                      hash="0" * 64, source="tests/gpu")
    args = fast_rm_args(backbone, device=str(CUDA))
    summary = run(Settings(home=tmp_path / "home"), data, args, register=False, out=tmp_path / "rm")
    assert summary["eval_accuracy"] >= 0.9

    texts = list(dict.fromkeys(t for g in data.eval_groups for t in g.texts))
    on_gpu = RewardModel.load(tmp_path / "rm", device=CUDA)
    on_cpu = RewardModel.load(tmp_path / "rm", device="cpu")
    gpu_scores = torch.tensor(score_texts(*on_gpu, texts))
    cpu_scores = torch.tensor(score_texts(*on_cpu, texts))
    torch.testing.assert_close(gpu_scores, cpu_scores, rtol=1e-3, atol=1e-3)
    assert pair_accuracy(*on_gpu, data.eval_groups)[0] == pytest.approx(summary["eval_accuracy"])
