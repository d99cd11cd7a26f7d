"""Optional LoRA (peft) for PPO on policies too big to fine-tune whole: only low-rank adapters A, B (and the
critic's head) are trained, so the optimiser state shrinks from 2× the model to 2× the adapters.

Three consequences the trainer relies on:
- π_ref comes for free: when PPO starts from the reference policy, the reference is the same network with its
  adapters switched off, so no second copy of the model is loaded.
- The rollout engine gets merged weights: W + (alpha/r)·B·A for every adapted layer, under the base model's
  parameter names, computed without touching the trained module (merging in place and back would drift W by
  rounding every iteration). vLLM then samples from exactly the trained policy, as in the full fine-tuning
  path, and the logprob gap stays a meaningful check.
- Checkpoints hold only what is trained (adapters, critic head); the released policy is the merged model, a
  plain transformers folder that the policy service serves like any other version.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from torch import nn


def add_adapters(model: nn.Module, rank: int, alpha: float, target_modules: str = "all-linear") -> nn.Module:
    """`model` wrapped by peft with fresh adapters of rank `rank` scaled by alpha/rank (B = 0: the wrapped
    model computes exactly what `model` did), every base weight frozen. `target_modules` is "all-linear"
    (every linear layer but the output head) or comma-separated module names ("q_proj,v_proj", the LoRA
    paper's choice). No LoRA dropout: PPO's old and new log-probs must come from the same function."""
    from peft import LoraConfig, get_peft_model

    # A new config per model: peft rewrites the config it is given into the names it resolved.
    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    config = getattr(model, "config", None)
    if "lm_head" in targets and getattr(config, "tie_word_embeddings", False):
        # An adapted head would no longer equal the input embeddings, which the engine reads it from.
        raise ValueError("lora_target_modules: this model ties lm_head to its input embeddings, so lm_head "
                         "cannot take an adapter; leave it out (all-linear does)")
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
    return get_peft_model(model, lora)


def is_lora(model: nn.Module) -> bool:
    # Without adapters peft was never imported (nor need it be: it pulls in accelerate, seconds on a CPU).
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def merged_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model as a plain transformers model would name it, adapters merged in; a model
    without adapters yields its own state dict."""
    if not is_lora(model):
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapted = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        if owner in adapted and leaf == "weight":
            layer = adapted[owner]
            tensor = tensor + sum(layer.get_delta_weight(a) for a in layer.active_adapters).to(tensor.dtype)
            yield f"{owner}.weight", tensor.detach()
        else:
            yield name.replace(".base_layer.", "."), tensor


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters an optimiser updates (what a LoRA checkpoint must keep)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restores `trainable_state`; refuses a state that does not cover exactly the trainable parameters."""
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        raise ValueError(f"checkpoint does not fit this model: missing {sorted(expected - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - expected)[:5]}")
    model.load_state_dict(state, strict=False)  # the frozen weights are the base's, already loaded


def merged_model(model: nn.Module) -> nn.Module:
    """The plain transformers model with adapters folded in (for saving the released policy)."""
    return model.merge_and_unload() if is_lora(model) else model
