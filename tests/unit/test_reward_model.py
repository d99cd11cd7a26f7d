"""alignloop.reward_model.pool: which hidden state stands for a sequence under each pooling, padding aside."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from alignloop.reward_model import pool

# Two sequences of 4 positions, hidden size 1, the hidden state equal to its position (+10 on the second row).
HIDDEN = torch.tensor([[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]]).unsqueeze(-1)
OUT = SimpleNamespace(last_hidden_state=HIDDEN, pooler_output=torch.tensor([[7.0], [8.0]]))
RIGHT_PADDED = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
LEFT_PADDED = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])


@pytest.mark.parametrize(("pooling", "mask", "expected"), [
    ("cls", RIGHT_PADDED, [0.0, 10.0]),
    ("pooler", RIGHT_PADDED, [7.0, 8.0]),
    ("mean", RIGHT_PADDED, [1.0, 10.5]),  # the padded positions do not count
    ("mean", LEFT_PADDED, [2.0, 12.5]),
    ("last", RIGHT_PADDED, [2.0, 11.0]),  # the last real token, not the last position
    ("last", LEFT_PADDED, [3.0, 13.0]),
])
def test_pool_reads_the_real_tokens(pooling: str, mask: torch.Tensor, expected: list[float]):
    assert pool(OUT, mask, pooling).squeeze(-1).tolist() == expected


def test_pool_names_an_unknown_pooling():
    with pytest.raises(ValueError, match="'max'"):
        pool(OUT, RIGHT_PADDED, "max")
