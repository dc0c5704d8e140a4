"""The memory budget (vaefast._memory) and the digests that bind results to their inputs (vaefast._digest)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vaefast._digest import model_digest, tensor_digest
from vaefast._memory import MemoryBudgetError, activation_bytes, check_max_memory, default_max_memory, rows_that_fit


def test_default_budget_and_its_checks() -> None:
    budget = default_max_memory("cpu")
    assert 0 < budget <= 4 * 2**30
    assert check_max_memory(None, "cpu") == budget
    assert check_max_memory(1234, "cpu") == 1234
    with pytest.raises(ValueError, match="max_memory"):
        check_max_memory(0, "cpu")
    with pytest.raises(TypeError, match="max_memory"):
        check_max_memory(1.5, "cpu")


def test_rows_that_fit_and_a_row_that_does_not() -> None:
    assert rows_that_fit(100, 1000, "x") == 10
    with pytest.raises(MemoryBudgetError, match="max_memory=99 bytes is too small: decoding one sample"):
        rows_that_fit(100, 99, "decoding one sample")


def test_activation_bytes_counts_every_module_output() -> None:
    net = nn.Sequential(nn.Linear(3, 100), nn.ReLU(), nn.Linear(100, 7))
    x = torch.zeros(1, 3)
    # input 3, Linear 100, ReLU 100, Linear 7, the Sequential's output 7 and the result 7 (float32)
    assert activation_bytes(net, x) == 4 * (3 + 100 + 100 + 7 + 7 + 7)


def test_digests_change_with_any_entry_and_with_absence() -> None:
    x = torch.arange(12.0).reshape(3, 4)
    base = tensor_digest([x])
    assert tensor_digest([x.clone()]) == base
    y = x.clone()
    y[1, 2] += 1e-6
    assert tensor_digest([y]) != base
    assert tensor_digest([x.flip(0)]) != base  # a permutation
    assert tensor_digest([x, None]) != tensor_digest([x, torch.zeros_like(x)])
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    assert model_digest(a) != model_digest(b)
    b.load_state_dict(a.state_dict())
    assert model_digest(a) == model_digest(b)
