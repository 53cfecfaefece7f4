"""Tests for dftlite.estimators.LogUTable: the eq. (10) recursion over steps, init modes, state.

Run: .venv/bin/python -m pytest tests/test_estimators.py -q
"""

import math

import pytest
import torch

from dftlite.estimators import LogUTable
from dftlite.losses import dft2_loss


def train_step(table, indices, g_hats, gamma):
    """One trainer-like step with DFT2, B=1, τ=1, so that ĝ_i = exp(s'_i) exactly."""
    log_u_prev, per_example_gamma = table.lookup(indices, gamma)
    neg_scores = torch.tensor([[math.log(g)] for g in g_hats], dtype=torch.float64)
    _, new_log_u, _ = dft2_loss(torch.zeros(len(indices)), neg_scores, log_u_prev, tau=1.0, gamma=per_example_gamma)
    table.update(indices, new_log_u)
    return per_example_gamma


def test_init_one_recursion():
    table = LogUTable(4, init="one")
    assert table.log_u.dtype == torch.float64 and table.log_u.tolist() == [0.0] * 4
    gamma = train_step(table, [1, 3], [3.0, 0.5], 0.5)
    assert gamma.tolist() == [0.5, 0.5]
    # u_0 = 1: u = 0.5·1 + 0.5·3 = 2 and 0.5·1 + 0.5·0.5 = 0.75
    assert table.log_u.exp().tolist() == pytest.approx([1.0, 2.0, 1.0, 0.75], rel=1e-14)
    train_step(table, [3, 0], [2.0, 5.0], 0.5)
    # u_3 = 0.5·0.75 + 0.5·2 = 1.375; u_0 = 0.5·1 + 0.5·5 = 3
    assert table.log_u.exp().tolist() == pytest.approx([3.0, 2.0, 1.0, 1.375], rel=1e-14)
    train_step(table, [1], [0.25], 1.0)
    # γ = 1 replaces u by the mini-batch estimate
    assert table.log_u[1].item() == math.log(0.25)
    assert table.visits.tolist() == [1, 2, 0, 2]


def test_first_batch_init_recursion():
    table = LogUTable(3, init="first_batch")
    gamma = train_step(table, [0, 2], [3.0, 0.5], 0.5)
    assert gamma.tolist() == [1.0, 1.0]  # both unvisited: start from ĝ, not from 1
    assert table.log_u.exp().tolist() == pytest.approx([3.0, 1.0, 0.5], rel=1e-14)
    gamma = train_step(table, [2, 1], [1.5, 4.0], 0.5)
    assert gamma.tolist() == [0.5, 1.0]  # 2 visited, 1 not
    # u_2 = 0.5·0.5 + 0.5·1.5 = 1; u_1 = 4
    assert table.log_u.exp().tolist() == pytest.approx([3.0, 4.0, 1.0], rel=1e-14)
    gamma = train_step(table, [0, 1, 2], [1.0, 1.0, 1.0], 0.25)
    assert gamma.tolist() == [0.25, 0.25, 0.25]
    assert table.log_u.exp().tolist() == pytest.approx([2.5, 3.25, 1.0], rel=1e-14)
    assert table.visits.tolist() == [2, 2, 3]


def test_lookup_returns_copies_and_does_not_change_the_table():
    table = LogUTable(3)
    table.update(torch.tensor([0, 1, 2]), torch.tensor([0.5, -1.0, 2.0]))
    log_u_prev, _ = table.lookup(torch.tensor([2, 0]), 0.9)
    assert log_u_prev.tolist() == [2.0, 0.5]
    log_u_prev += 100.0
    table.lookup([0, 1], 0.9)
    assert table.log_u.tolist() == [0.5, -1.0, 2.0]
    assert table.visits.tolist() == [1, 1, 1]


def test_state_dict_round_trip():
    table = LogUTable(5, init="first_batch")
    table.update([4, 1], torch.tensor([0.25, -3.5], dtype=torch.float64))
    table.update([4], torch.tensor([1.5]))
    state = table.state_dict()
    assert set(state) == {"log_u", "visits"}
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    restored = LogUTable(5, init="first_batch")
    restored.load_state_dict(state)
    assert torch.equal(restored.log_u, table.log_u) and torch.equal(restored.visits, table.visits)
    # the saved state is a snapshot, not a view of the live table
    table.update([0], torch.tensor([9.0]))
    assert state["log_u"][0].item() == 0.0
    # restored visits drive first_batch's γ = 1 exactly as before saving
    assert restored.lookup([0, 1, 4], 0.5)[1].tolist() == [1.0, 0.5, 0.5]


def test_update_accepts_loss_output_from_any_dtype():
    table = LogUTable(2)
    table.update(torch.tensor([1]), torch.tensor([0.5], dtype=torch.float32))
    assert table.log_u.dtype == torch.float64 and table.log_u[1].item() == 0.5


def test_errors():
    with pytest.raises(ValueError, match="num_examples"):
        LogUTable(0)
    with pytest.raises(ValueError, match="init"):
        LogUTable(3, init="zero")
    table = LogUTable(3)
    with pytest.raises(IndexError):
        table.lookup([0, 3], 0.5)
    with pytest.raises(IndexError):
        table.lookup([-1], 0.5)  # no Python-style wrap-around
    with pytest.raises(ValueError, match="distinct"):
        table.lookup([1, 1], 0.5)
    with pytest.raises(ValueError, match="distinct"):
        table.update([2, 2], torch.zeros(2))
    with pytest.raises(ValueError, match="integer"):
        table.lookup(torch.tensor([0.0, 1.0]), 0.5)
    with pytest.raises(ValueError, match="gamma"):
        table.lookup([0], 0.0)
    with pytest.raises(ValueError, match="shape"):
        table.update([0, 1], torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        table.update([0, 1], torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="finite"):
        table.update([0], torch.tensor([float("-inf")]))
    # a failed update leaves the table untouched
    assert table.log_u.tolist() == [0.0, 0.0, 0.0] and table.visits.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="examples"):
        table.load_state_dict(LogUTable(4).state_dict())
    with pytest.raises(KeyError, match="visits"):
        table.load_state_dict({"log_u": torch.zeros(3)})
