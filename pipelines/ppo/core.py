"""The arithmetic of PPO for language models (InstructGPT §3.5, Ziegler et al. 2019), on padded tensors.

Every tensor here is [batch, response_tokens] with a 0/1 `mask` marking real response tokens (padding after
an answer's end is 0). Token t of an answer is an action; its state is the prompt plus tokens < t.

Per-token reward (InstructGPT eq. 2, as a sum over the answer's tokens):
    r_t = − beta · (log π(a_t|s_t) − log π_ref(a_t|s_t))          every token: the KL penalty
        + RM(x, y)                                                 added on the answer's last token

Advantages by GAE (Schulman et al. 2016) with `gamma` and `lam`, returns = advantages + values; the
clipped surrogate and the clipped value loss are those of PPO (Schulman et al. 2017) as CleanRL writes them.
Or, without a critic, by a leave-one-out baseline over the answers to the same prompt (`rloo_advantages`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over real tokens (all of them, or per row with `dim`)."""
    if dim is None:
        return masked_sum(x, mask) / mask.sum().clamp(min=1)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over real tokens."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / n.clamp(min=1)
    return var * n / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / std over real tokens; padding comes back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t (module docstring) and the per-token KL estimate log π − log π_ref.

    scores: [batch] the RM's reward of each whole answer. An answer with no tokens gets nothing.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    lengths = mask.sum(1).long()
    has_tokens = lengths > 0
    last = (lengths - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows[has_tokens], last[has_tokens]] += scores[has_tokens].to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (= advantages + values), 0 on padding.

    The episode ends after the last real token: its next value is 0 (no bootstrap past the answer)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    steps = rewards.shape[1]
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        # On padding, carry nothing back: the row's real tokens end before it.
        last_gae = last_gae * mask[:, t]
        advantages[:, t] = last_gae
    return advantages, (advantages + values) * mask


def rloo_advantages(rewards: torch.Tensor, groups: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): an answer's return R_i (its
    per-token rewards summed: RM score − beta·KL) minus the mean return of the other answers in its group
    (the same prompt), on each of its tokens; and the returns [batch]. An answer alone in its group gets 0."""
    returns = masked_sum(rewards, mask, 1)
    n_groups = int(groups.max().item()) + 1 if groups.numel() else 0
    sums = torch.zeros(n_groups, dtype=returns.dtype, device=returns.device).index_add_(0, groups, returns)
    counts = torch.zeros(n_groups, dtype=returns.dtype, device=returns.device).index_add_(
        0, groups, torch.ones_like(returns))
    others = counts[groups] - 1
    baseline = (sums[groups] - returns) / others.clamp(min=1)
    advantages = torch.where(others > 0, returns - baseline, torch.zeros_like(returns))
    return advantages[:, None] * mask, returns


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor  # share of tokens whose ratio was clipped
    approx_kl: torch.Tensor  # E[(r − 1) − log r], Schulman's low-variance KL(old ‖ new) estimate


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float) -> PolicyLoss:
    """PPO's clipped surrogate, as a loss to minimise, averaged over real tokens."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip_range).to(ratio.dtype), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return PolicyLoss(loss, clip_fraction, approx_kl)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """½ · max((V − R)², (V_clipped − R)²) over real tokens (value clipping as in PPO2/CleanRL), and the
    share of tokens where the clipped term was the larger. `clip_range_value=None` turns clipping off."""
    unclipped = (values - returns) ** 2
    if clip_range_value is None:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros((), device=values.device)
    v_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return loss, clip_fraction


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the softmax over the vocabulary."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(token) at each position: logits [B, T, V] predicting `tokens` [B, T]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class FixedKLController:
    """A constant `beta`."""

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019 §2.2: beta follows a log-space proportional controller towards `target` KL
    (nats per answer), moving at most ±20% of the way per `horizon` samples:
        e = clip(KL / target − 1, −0.2, 0.2);   beta ← beta · (1 + e · n_steps / horizon)."""

    def __init__(self, beta: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("the adaptive KL controller needs target > 0 and horizon > 0")
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
