"""What every trainer here (reward model, SFT, PPO) sets up the same way: seeds, the device, CPU threads and
the linear warm-up/decay learning-rate schedule."""

from __future__ import annotations

import os
import random

import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto": this process's GPU (LOCAL_RANK under torchrun) when there is one, else the CPU. A bare "cuda"
    also means this process's GPU: torch.cuda.set_device refuses a device without an index."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


def configure_threads(threads: int | None) -> int:
    """One intra-op thread per usable core; inter-op parallelism only oversubscribes a small machine."""
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel op; a second run in-process keeps it
        pass
    return n


def linear_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: 0 → 1 over `warmup` steps, then linearly down to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))
