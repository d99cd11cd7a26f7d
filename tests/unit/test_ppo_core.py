"""PPO arithmetic against hand-computed values (pipelines/ppo/core.py)."""

import math

import pytest
import torch

from pipelines.ppo import core


def test_kl_penalized_rewards_put_the_score_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = core.kl_penalized_rewards(torch.tensor([10.0, 20.0]), logprobs, ref, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 10.1], [-0.1, 20.0, 0.0]]))


def test_kl_penalized_rewards_skip_empty_answers():
    mask = torch.zeros(1, 2)
    rewards, _ = core.kl_penalized_rewards(torch.tensor([5.0]), torch.zeros(1, 2), torch.zeros(1, 2), mask, 0.1)
    assert rewards.abs().sum() == 0


def test_gae_matches_the_recursion_and_ignores_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.25, 0.75, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.8
    adv, ret = core.gae(rewards, values, mask, gamma, lam)
    d2 = 1.0 - 0.75  # last real token: no bootstrap
    d1 = 0.0 + gamma * 0.75 - 0.25
    d0 = 0.0 + gamma * 0.25 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.25, a2 + 0.75, 0.0])


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.1, 0.2, 0.3]])
    adv, ret = core.gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert ret[0].tolist() == pytest.approx([6.0, 5.0, 3.0])
    assert adv[0].tolist() == pytest.approx([5.9, 4.8, 2.7])


def test_whitening_uses_real_tokens_only():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = core.masked_whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.std().item() == pytest.approx(1.0, abs=1e-4)
    assert w[:, 2].abs().sum() == 0


def test_policy_loss_clips_the_ratio():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    out = core.policy_loss(new, old, adv, torch.ones(1, 2), clip_range=0.2)
    # loss = max(−A·r, −A·clip(r)): token 0 max(−1.5, −1.2) = −1.2; token 1 max(0.5, 0.8) = 0.8
    assert out.loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert out.clip_fraction.item() == pytest.approx(1.0)
    expected_kl = ((1.5 - 1 - math.log(1.5)) + (0.5 - 1 - math.log(0.5))) / 2
    assert out.approx_kl.item() == pytest.approx(expected_kl)


def test_policy_loss_gradient_vanishes_once_clipped():
    new = torch.log(torch.tensor([[1.5]])).requires_grad_()
    core.policy_loss(new, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2).loss.backward()
    assert new.grad.abs().item() == 0.0


def test_value_loss_clipping():
    old = torch.tensor([[0.0]])
    new = torch.tensor([[1.0]])
    ret = torch.tensor([[2.0]])
    unclipped, frac = core.value_loss(new, old, ret, torch.ones(1, 1), None)
    assert unclipped.item() == pytest.approx(0.5)
    clipped, frac = core.value_loss(new, old, ret, torch.ones(1, 1), 0.2)
    assert clipped.item() == pytest.approx(0.5 * 1.8 ** 2)
    assert frac.item() == 1.0


def test_token_logprobs_and_entropy():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    assert core.token_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.25))
    assert core.entropy_from_logits(logits).item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    ctl = core.AdaptiveKLController(beta=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=12.0, n_steps=1_000)  # error clipped to +0.2
    assert ctl.beta == pytest.approx(0.1 * 1.02)
    ctl.update(current_kl=3.0, n_steps=1_000)  # error −0.5 → −0.2
    assert ctl.beta == pytest.approx(0.1 * 1.02 * 0.98)
    with pytest.raises(ValueError):
        core.AdaptiveKLController(0.1, target=0, horizon=1)


def test_rloo_advantage_is_the_return_minus_the_other_answers_mean():
    # Two prompts: answers 0, 1, 2 to prompt 0, answers 3, 4 to prompt 1, answer 5 alone to prompt 2.
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 0, 0]], dtype=torch.float32)
    rewards = torch.tensor([[0.5, 1.5, 9.0], [3.0, 9.0, 9.0], [1.0, 1.0, 1.0], [2.0, 2.0, 9.0], [1.0, 9.0, 9.0],
                            [5.0, 9.0, 9.0]])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    advantages, returns = core.rloo_advantages(rewards, groups, mask)
    assert returns.tolist() == [2.0, 3.0, 3.0, 4.0, 1.0, 5.0]  # padding is not summed
    expected = [2 - 3, 3 - 2.5, 3 - 2.5, 4 - 1, 1 - 4, 0.0]  # alone in its group: no baseline, no signal
    assert torch.allclose(advantages, torch.tensor(expected)[:, None] * mask)
    # The same amount added to the return of every answer to a prompt changes nothing.
    bonus = torch.zeros_like(rewards)
    bonus[:3, 0] = 7.0
    shifted, _ = core.rloo_advantages(rewards + bonus, groups, mask)
    assert torch.allclose(shifted[:3], advantages[:3])
