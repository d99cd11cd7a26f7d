"""pipelines.training: what every trainer sets up the same way."""

from __future__ import annotations

import torch

from pipelines.training import pick_device


def test_a_bare_cuda_names_this_process_gpu_as_auto_does():
    # torch.cuda.set_device refuses torch.device("cuda"): `--device cuda` once crashed PPO on a GPU machine.
    assert pick_device("cuda") == torch.device("cuda", 0)
    assert pick_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert pick_device("cuda:1", local_rank=3) == torch.device("cuda", 1)
    assert pick_device("cpu", local_rank=3) == torch.device("cpu")
    expected = torch.device("cuda", 2) if torch.cuda.is_available() else torch.device("cpu")
    assert pick_device("auto", local_rank=2) == expected
