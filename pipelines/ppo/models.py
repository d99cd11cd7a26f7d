"""The networks of a PPO run: the policy π (trained), the reference π_ref (frozen SFT model, for the KL
penalty) and the critic V (trained), plus the one forward pass all three need: per-token outputs over the
answer tokens of padded (prompt + answer) rows.

The critic is a separate network: the policy's transformer body with a scalar head per position. InstructGPT
initialises it from the RM; that is possible only when the RM reads the policy's tokens (an RM on the
policy's architecture and tokenizer). alignloop's default RM (MiniLM) has its own tokenizer, so by default
the critic's body starts from the reference policy and its head from zeros (values start at 0, GAE's
advantages start as discounted rewards). `init_value_from_reward` takes the RM's body and head instead when
they fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipelines.ppo.core import entropy_from_logits, token_logprobs


class ValueModel(nn.Module):
    """A transformer body and Linear(hidden, 1): one value per position."""

    def __init__(self, body: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)

    @classmethod
    def from_policy_folder(cls, folder: Path, dtype: torch.dtype = torch.float32) -> ValueModel:
        from transformers import AutoModel

        body = AutoModel.from_pretrained(str(folder), dtype=dtype)
        return cls(body, body.config.hidden_size)

    @classmethod
    def from_reward_model(cls, folder: Path, dtype: torch.dtype = torch.float32) -> ValueModel:
        """Body and head of a saved RM (alignloop.reward_model format); the caller checks the tokenizers."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        body = AutoModel.from_pretrained(str(folder / "backbone"), dtype=dtype)
        model = cls(body, body.config.hidden_size)
        model.head.load_state_dict(load_file(str(folder / "head.safetensors")))
        return model

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        self.body.save_pretrained(str(folder / "body"))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  str(folder / "head.safetensors"))


def same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two folders' tokenizers map text to the same ids (compared on their vocabularies)."""
    from transformers import AutoTokenizer

    ta, tb = AutoTokenizer.from_pretrained(str(a)), AutoTokenizer.from_pretrained(str(b))
    return ta.get_vocab() == tb.get_vocab()


def load_policy(folder: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)


@dataclass
class RolloutBatch:
    """Padded (prompt + answer) rows, answers starting at one column (prompts left-padded)."""

    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T]
    response_ids: torch.Tensor  # [B, T]
    response_mask: torch.Tensor  # [B, T] float, 1 on real answer tokens
    prompt_width: int  # P

    def to(self, device: torch.device) -> RolloutBatch:
        return RolloutBatch(self.input_ids.to(device), self.attention_mask.to(device),
                            self.response_ids.to(device), self.response_mask.to(device), self.prompt_width)

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        return RolloutBatch(self.input_ids[rows], self.attention_mask[rows], self.response_ids[rows],
                            self.response_mask[rows], self.prompt_width)


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> RolloutBatch:
    """Left-pads prompts and right-pads answers so every answer starts at column P."""
    width_p = max(len(p) for p in prompts)
    width_r = max(1, max(len(r) for r in responses))
    rows = len(prompts)
    input_ids = torch.full((rows, width_p + width_r), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    response_mask = torch.zeros((rows, width_r))
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        input_ids[i, width_p - len(p):width_p] = torch.tensor(p, dtype=torch.long)
        attention[i, width_p - len(p):width_p] = 1
        if r:
            input_ids[i, width_p:width_p + len(r)] = torch.tensor(r, dtype=torch.long)
            attention[i, width_p:width_p + len(r)] = 1
            response_mask[i, :len(r)] = 1.0
    return RolloutBatch(input_ids, attention, input_ids[:, width_p:].clone(), response_mask, width_p)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # Left padding: positions count from each row's first real token, as they did when it was sampled.
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def policy_forward(model, batch: RolloutBatch, *, with_entropy: bool = False):
    """(log π(answer tokens) [B, T], entropy [B, T] or None) for a causal LM."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=_positions(batch.attention_mask)).logits
    # Position P-1+t predicts answer token t.
    logits = logits[:, batch.prompt_width - 1:-1]
    logprobs = token_logprobs(logits, batch.response_ids)
    entropy = entropy_from_logits(logits) if with_entropy else None
    return logprobs, entropy


def value_forward(critic: ValueModel, batch: RolloutBatch) -> torch.Tensor:
    """V(state before answer token t) [B, T]: the value read at the position that predicts token t."""
    hidden = critic.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=_positions(batch.attention_mask)).last_hidden_state
    values = critic.head(hidden.to(critic.head.weight.dtype)).squeeze(-1)
    return values[:, batch.prompt_width - 1:-1]
