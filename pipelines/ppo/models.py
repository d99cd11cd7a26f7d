"""The networks of a PPO run: the policy π (trained), the reference π_ref (frozen SFT model, for the KL
penalty) and the critic V (trained), plus the one forward pass all three need: per-token outputs over the
answer tokens of padded (prompt + answer) rows.

The critic is a separate network: the policy's transformer body with a scalar head per position. InstructGPT
initialises it from the RM; that is possible only when the RM reads the policy's tokens (an RM on the
policy's architecture and tokenizer). alignloop's default RM (MiniLM) has its own tokenizer, so by default
the critic's body starts from the reference policy and its head from zeros (values start at 0, GAE's
advantages start as discounted rewards). `ValueModel.from_reward_model` takes the RM's body and head
instead when they fit (`--value-from-reward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipelines.ppo.core import entropy_from_logits, token_logprobs


class ValueModel(nn.Module):
    """A transformer body and Linear(hidden, 1): V(state before answer token t) for every answer token."""

    def __init__(self, body: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: RolloutBatch) -> torch.Tensor:
        """[B, T]: the value read at the position that predicts answer token t (a module's forward, so DDP
        averages the critic's gradients like the policy's)."""
        hidden = self.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=_positions(batch.attention_mask)).last_hidden_state
        values = self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)
        return values[:, batch.prompt_width - 1:-1]

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


def same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two folders' tokenizers map text to the same ids (compared on their vocabularies)."""
    from transformers import AutoTokenizer

    ta, tb = AutoTokenizer.from_pretrained(str(a)), AutoTokenizer.from_pretrained(str(b))
    return ta.get_vocab() == tb.get_vocab()


def load_policy(folder: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)


def save_policy(model, tokenizer, folder: Path, base_dir: Path) -> None:
    """A trained policy as a folder vLLM and transformers load: weights, tokenizer, and the base's
    generation_config.json (its stop tokens), which training does not change."""
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    gen = base_dir / "generation_config.json"
    if gen.exists() and not (folder / "generation_config.json").exists():
        (folder / "generation_config.json").write_text(gen.read_text())


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prompt_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat template's generation prompt, tokenised as the policy service does."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def demonstration_ids(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a demonstration: a conversation whose last message is the assistant's.
    The answer ends with the template's end-of-turn, so the model learns to stop."""
    prompt = prompt_token_ids(tokenizer, messages[:-1])
    whole = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    if whole[:len(prompt)] != prompt:  # a template that renders history differently: fall back to text
        answer = tokenizer.encode(messages[-1]["content"], add_special_tokens=False) + [tokenizer.eos_token_id]
    else:
        answer = whole[len(prompt):]
        # Drop the template's trailing newline after the end-of-turn token, if any.
        while answer and tokenizer.decode(answer[-1:]).strip() == "" and answer[-1] != tokenizer.eos_token_id:
            answer = answer[:-1]
    return prompt, answer


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
