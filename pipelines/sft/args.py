"""SFT hyper-parameters, apart from the trainer so the CLI reads them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Args:
    epochs: int = 2
    lr: float = 1e-5
    batch_size: int = 8
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    max_length: int = 1024  # prompt + answer tokens; longer demonstrations lose the start of the prompt
    seed: int = 0
