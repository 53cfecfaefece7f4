"""Tests for dftlite.losses: float64 brute force of eqs. 6-13, hand-worked values, extremes.

Run: .venv/bin/python -m pytest tests/test_losses.py -q
"""

import math

import pytest
import torch

from dftlite.losses import (
    dft2_loss,
    dft_loss,
    dpo_loss,
    method_loss,
    sft_loss,
    simpo_loss,
    update_log_u,
)


def brute_force(pos, neg, ref, u_prev, tau, gammas):
    """Eqs. 6-13 with plain Python floats and the non-log recursion u = (1-γ)u + γĝ.

    pos [S], neg [S][B], ref [S][B] or None (DFT2), u_prev [S] (u, not log u), gammas [S].
    Returns (objective, log_u_new [S], grad_pos [S], grad_neg [S][B]) of the mean over prompts.
    """
    num_prompts, num_negatives = len(neg), len(neg[0])
    objective, log_u_new, grad_pos, grad_neg = 0.0, [], [], []
    for i in range(num_prompts):
        w = [neg[i][j] / tau - (ref[i][j] if ref is not None else 0.0) for j in range(num_negatives)]
        g_hat = math.fsum(math.exp(w_j) for w_j in w) / num_negatives  # eq. 7 / 12, mini-batch
        u_new = (1 - gammas[i]) * u_prev[i] + gammas[i] * g_hat  # eq. 10
        objective += (-pos[i] + tau * math.log(u_new)) / num_prompts  # eq. 6 / 11
        log_u_new.append(math.log(u_new))
        grad_pos.append(-1.0 / num_prompts)  # eq. 8 / 13, first term
        grad_neg.append([math.exp(w_j) / (num_negatives * u_new) / num_prompts for w_j in w])
    return objective, log_u_new, grad_pos, grad_neg


def run_loss(pos, neg, ref, log_u_prev, tau, gamma):
    pos = pos.clone().requires_grad_(True)
    neg = neg.clone().requires_grad_(True)
    if ref is None:
        loss, new_log_u, metrics = dft2_loss(pos, neg, log_u_prev, tau=tau, gamma=gamma)
    else:
        loss, new_log_u, metrics = dft_loss(pos, neg, ref, log_u_prev, tau=tau, gamma=gamma)
    loss.backward()
    return loss, new_log_u, metrics, pos.grad, neg.grad


@pytest.mark.parametrize("variant", ["dft", "dft2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(variant, seed):
    generator = torch.Generator().manual_seed(seed)
    num_prompts, num_negatives = 4, 5
    if variant == "dft":
        tau = 1.0
        pos = -torch.empty(num_prompts, dtype=torch.float64).uniform_(5, 30, generator=generator)
        neg = -torch.empty(num_prompts, num_negatives, dtype=torch.float64).uniform_(5, 30, generator=generator)
        ref = -torch.empty(num_prompts, num_negatives, dtype=torch.float64).uniform_(5, 30, generator=generator)
    else:
        tau = 0.3
        pos = -torch.empty(num_prompts, dtype=torch.float64).uniform_(0.2, 3, generator=generator)
        neg = -torch.empty(num_prompts, num_negatives, dtype=torch.float64).uniform_(0.2, 3, generator=generator)
        ref = None
    log_u_prev = torch.empty(num_prompts, dtype=torch.float64).uniform_(-3, 3, generator=generator)
    gammas = [0.9, 0.5, 1.0, 0.1]

    loss, new_log_u, metrics, grad_pos, grad_neg = run_loss(
        pos, neg, ref, log_u_prev, tau, torch.tensor(gammas, dtype=torch.float64)
    )
    expected = brute_force(
        pos.tolist(), neg.tolist(), None if ref is None else ref.tolist(), log_u_prev.exp().tolist(), tau, gammas
    )
    objective, expected_log_u, expected_grad_pos, expected_grad_neg = expected
    assert loss.item() == pytest.approx(objective, rel=1e-12, abs=1e-12)
    assert new_log_u.tolist() == pytest.approx(expected_log_u, rel=1e-12, abs=1e-12)
    assert not new_log_u.requires_grad
    assert grad_pos.tolist() == pytest.approx(expected_grad_pos, rel=1e-12)
    for row, expected_row in zip(grad_neg.tolist(), expected_grad_neg):
        assert row == pytest.approx(expected_row, rel=1e-10, abs=1e-300)
    # metrics restate the two parts of the objective
    assert (metrics["neg_part"] + metrics["sft_part"]).item() == pytest.approx(objective, rel=1e-12)
    assert metrics["sft_part"].item() == pytest.approx(-pos.mean().item())


def test_scalar_gamma_equals_tensor_gamma():
    pos = torch.tensor([-3.0, -4.0])
    neg = torch.tensor([[-5.0, -6.0], [-2.0, -9.0]])
    ref = torch.tensor([[-4.0, -4.0], [-3.0, -8.0]])
    log_u_prev = torch.tensor([0.2, -0.4])
    loss_a, log_u_a, _ = dft_loss(pos, neg, ref, log_u_prev, tau=1.0, gamma=0.7)
    loss_b, log_u_b, _ = dft_loss(pos, neg, ref, log_u_prev, tau=1.0, gamma=torch.tensor([0.7, 0.7], dtype=torch.float64))
    assert torch.equal(loss_a, loss_b) and torch.equal(log_u_a, log_u_b)


def test_known_value_dft():
    # S=1, B=2, τ=1, γ=0.5, u_prev=1, s=-1, negatives -2, -3, refs -1, -1:
    #   w = (-2+1, -3+1) = (-1, -2)
    #   ĝ = (e^-1 + e^-2)/2 = (0.36787944 + 0.13533528)/2 = 0.25160736
    #   u_new = 0.5·1 + 0.5·0.25160736 = 0.62580368, log u_new = -0.46871857
    #   loss = 1 + log u_new = 0.53128143
    #   d/ds = -1; d/ds_j = e^{w_j}/(2·u_new) = 0.29392560, 0.10812918
    loss, new_log_u, metrics, grad_pos, grad_neg = run_loss(
        torch.tensor([-1.0]), torch.tensor([[-2.0, -3.0]]), torch.tensor([[-1.0, -1.0]]), torch.zeros(1), 1.0, 0.5
    )
    assert loss.item() == pytest.approx(0.53128143, abs=1e-7)
    assert new_log_u.item() == pytest.approx(-0.46871857, abs=1e-7)
    assert grad_pos.item() == pytest.approx(-1.0)
    assert grad_neg[0].tolist() == pytest.approx([0.29392560, 0.10812918], abs=1e-7)
    # B·p = 2·(0.29392560, 0.10812918)
    assert metrics["weight_max"].item() == pytest.approx(0.58785119, abs=1e-7)
    assert metrics["weight_mean"].item() == pytest.approx(0.40205478, abs=1e-7)


def test_single_negative_mini_batch_limit():
    # B=1, γ=1: τ·log ĝ = s' - τ·ref, so DFT is -s + s' - τ·ref and DFT2 is -s + s'.
    pos, neg, ref = torch.tensor([-2.0]), torch.tensor([[-7.0]]), torch.tensor([[-3.0]])
    loss, _, _, grad_pos, grad_neg = run_loss(pos, neg, ref, torch.tensor([5.0]), 0.5, 1.0)
    assert loss.item() == pytest.approx(2.0 - 7.0 + 0.5 * 3.0)
    assert (grad_pos.item(), grad_neg.item()) == pytest.approx((-1.0, 1.0))
    loss, _, _, grad_pos, grad_neg = run_loss(pos, neg, None, torch.tensor([5.0]), 0.3, 1.0)
    assert loss.item() == pytest.approx(2.0 - 7.0)
    assert (grad_pos.item(), grad_neg.item()) == pytest.approx((-1.0, 1.0))


@pytest.mark.parametrize("log_u_prev", [0.0, -50.0, 1e4, float("inf"), float("-inf")])
def test_gamma_one_is_exact_mini_batch_estimate(log_u_prev):
    neg = torch.tensor([[-10.0, -12.5, -9.0], [-1e4, -3.0, -1.0]], dtype=torch.float64)
    ref = torch.tensor([[-11.0, -8.0, -9.5], [-1e4, -1e4, -2.0]], dtype=torch.float64)
    tau = 0.7
    log_g_hat = torch.logsumexp(neg / tau - ref, dim=1) - math.log(3)
    _, new_log_u, metrics = dft_loss(torch.zeros(2), neg, ref, torch.full((2,), log_u_prev), tau=tau, gamma=1.0)
    assert torch.equal(new_log_u, log_g_hat)
    # with u = ĝ the weights B·p_ij average to exactly one per prompt
    assert metrics["weight_mean"].item() == pytest.approx(1.0)
    assert torch.equal(update_log_u(torch.full((2,), log_u_prev, dtype=torch.float64), log_g_hat, 1.0), log_g_hat)


def test_update_log_u_matches_linear_recursion():
    log_u_prev = torch.tensor([0.0, math.log(2.0), math.log(0.1)], dtype=torch.float64)
    log_g_hat = torch.tensor([math.log(3.0), math.log(0.5), math.log(10.0)], dtype=torch.float64)
    gamma = torch.tensor([0.5, 0.25, 0.9], dtype=torch.float64)
    expected = [0.5 * 1 + 0.5 * 3, 0.75 * 2 + 0.25 * 0.5, 0.1 * 0.1 + 0.9 * 10]
    assert update_log_u(log_u_prev, log_g_hat, gamma).exp().tolist() == pytest.approx(expected, rel=1e-14)


def reference_in_log_space(pos, neg, ref, log_u_prev, tau, gamma):
    """Float64 via math: explicit max shift and fsum, so no exp ever overflows."""
    num_prompts, num_negatives = len(neg), len(neg[0])
    objective, log_u_new, grad_neg = 0.0, [], []
    for i in range(num_prompts):
        w = [neg[i][j] / tau - (ref[i][j] if ref is not None else 0.0) for j in range(num_negatives)]
        shift = max(w)
        log_g_hat = shift + math.log(math.fsum(math.exp(w_j - shift) for w_j in w) / num_negatives)
        terms = [math.log(1 - gamma) + log_u_prev[i], math.log(gamma) + log_g_hat]
        shift = max(terms)
        log_u = shift + math.log(math.fsum(math.exp(t - shift) for t in terms))
        objective += (-pos[i] + tau * log_u) / num_prompts
        log_u_new.append(log_u)
        grad_neg.append([math.exp(w_j - log_u) / num_negatives / num_prompts for w_j in w])
    return objective, log_u_new, grad_neg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["dft", "dft2"])
def test_extreme_scores_are_finite_and_correct(variant, dtype):
    pos = torch.tensor([-1e4, -1.0, -1e4], dtype=dtype)
    neg = torch.tensor([[-1e4, -1e4], [-1e4, -1.0], [-1.0, -1e4]], dtype=dtype)
    ref = torch.tensor([[-1e4, -1e4], [-1.0, -1e4], [-1e4, -1.0]], dtype=dtype) if variant == "dft" else None
    log_u_prev = torch.tensor([0.0, -1e4, 1e4], dtype=dtype)
    tau, gamma = 0.3, 0.9
    loss, new_log_u, metrics, grad_pos, grad_neg = run_loss(pos, neg, ref, log_u_prev, tau, gamma)
    for value in [loss, new_log_u, grad_pos, grad_neg, *metrics.values()]:
        assert torch.isfinite(value).all()
    assert loss.dtype == dtype and grad_neg.dtype == dtype
    objective, expected_log_u, expected_grad_neg = reference_in_log_space(
        pos.tolist(), neg.tolist(), None if ref is None else ref.tolist(), log_u_prev.tolist(), tau, gamma
    )
    assert loss.item() == pytest.approx(objective, rel=1e-6)
    assert new_log_u.tolist() == pytest.approx(expected_log_u, rel=1e-9)
    for row, expected_row in zip(grad_neg.tolist(), expected_grad_neg):
        assert row == pytest.approx(expected_row, rel=1e-5, abs=1e-30)


def test_weight_entropy_uniform_and_peaked():
    _, _, metrics = dft2_loss(torch.zeros(1), torch.full((1, 4), -2.0), torch.zeros(1), tau=1.0, gamma=1.0)
    assert metrics["weight_entropy"].item() == pytest.approx(math.log(4))
    _, _, metrics = dft2_loss(torch.zeros(1), torch.tensor([[-1.0, -1e4, -1e4, -1e4]]), torch.zeros(1), gamma=1.0)
    assert metrics["weight_entropy"].item() == pytest.approx(0.0, abs=1e-12)


def test_validation_errors():
    pos, neg, log_u = torch.zeros(2), torch.zeros(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match="gamma"):
        dft2_loss(pos, neg, log_u, gamma=0.0)
    with pytest.raises(ValueError, match="gamma"):
        dft2_loss(pos, neg, log_u, gamma=torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="tau"):
        dft2_loss(pos, neg, log_u, tau=0.0)
    with pytest.raises(ValueError, match="log_u_prev"):
        dft2_loss(pos, neg, torch.zeros(3))
    with pytest.raises(ValueError, match="neg_scores"):
        dft2_loss(pos, torch.zeros(3, 3), log_u)
    with pytest.raises(ValueError, match="neg_ref_logps"):
        dft_loss(pos, neg, torch.zeros(2, 2), log_u)


# --- baselines, 1 prompt × 2 negatives -------------------------------------------------


def test_sft_is_token_level():
    loss, _ = sft_loss(torch.tensor([-4.0]), torch.tensor([2]))
    assert loss.item() == pytest.approx(2.0)
    # (4 + 2) / (2 + 3) = 1.2, not the per-sequence mean (2 + 2/3)/2
    loss, _ = sft_loss(torch.tensor([-4.0, -2.0]), torch.tensor([2, 3]))
    assert loss.item() == pytest.approx(1.2)


def test_simpo_known_value():
    # β=2, γ = 0.5·β = 1; r_w = 2·(-4/2) = -4; r_l = 2·(-6/3) = -4 and 2·(-3/1) = -6
    # pair margins r_w - r_l - γ = -1 and 1:
    # loss = (log(1+e) + log(1+e^-1))/2 = 0.5 + log(1+e^-1) = 0.81326169
    args = (torch.tensor([-4.0]), torch.tensor([2]), torch.tensor([[-6.0, -3.0]]), torch.tensor([[3, 1]]))
    loss, metrics = simpo_loss(*args, beta=2.0, gamma_beta_ratio=0.5)
    assert loss.item() == pytest.approx(0.81326169, abs=1e-7)
    assert metrics["reward_margin"].item() == pytest.approx(1.0)  # mean of 0 and 2, γ excluded
    assert metrics["reward_accuracy"].item() == pytest.approx(0.5)
    loss, _, _ = method_loss("simpo_sft", *args, tau=1.0, beta=2.0, simpo_gamma_beta_ratio=0.5, sft_weight=0.5)
    assert loss.item() == pytest.approx(0.81326169 + 0.5 * 2.0, abs=1e-7)


def test_dpo_known_value_and_reference_limit():
    # β=0.5; π_w - ref_w = 1; π_l - ref_l = -1 and 2 → logits 0.5·(1+1) = 1 and 0.5·(1-2) = -0.5
    # loss = (log(1+e^-1) + log(1+e^0.5))/2 = (0.31326169 + 0.97407698)/2 = 0.64366934
    loss, metrics = dpo_loss(
        torch.tensor([-4.0]), torch.tensor([[-6.0, -3.0]]), torch.tensor([-5.0]), torch.tensor([[-5.0, -5.0]]), 0.5
    )
    assert loss.item() == pytest.approx(0.64366934, abs=1e-7)
    assert metrics["reward_margin"].item() == pytest.approx(0.25)
    assert metrics["reward_accuracy"].item() == pytest.approx(0.5)
    # policy = reference: every logit is 0 and the loss is log 2
    pos, neg = torch.tensor([-3.0, -8.0]), torch.tensor([[-1.0, -7.0, -2.0], [-4.0, -5.0, -6.0]])
    loss, _ = dpo_loss(pos, neg, pos, neg, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))


def test_dpo_is_stable_for_huge_margins():
    pos = torch.tensor([-1.0], requires_grad=True)
    loss, _ = dpo_loss(pos, torch.tensor([[-1e4]]), torch.tensor([-1e4]), torch.tensor([[-1.0]]), beta=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pos.grad).all()
    # margin 2e4 - 2: log(1 + e^-margin) underflows to 0, not log(0)
    loss, _ = dpo_loss(torch.tensor([-1e4]), torch.tensor([[-1.0]]), torch.tensor([-1.0]), torch.tensor([[-1e4]]), 1.0)
    assert loss.item() == pytest.approx(2e4 - 2)


@pytest.mark.parametrize("method, sft_weight", [("dft2", 0.5), ("dft", 0.25), ("dft2", 0.0)])
def test_sft_anchor_gradient_matches_float64_brute_force(method, sft_weight):
    """loss = mean_i[-s_i + τ·log u_new_i] + λ·(-Σ_i log P(y_i|x_i) / Σ_i |y_i|), and its gradient is eq. (8)/(13)
    plus λ times SFT's: worked out here from the paper's formulas, not from dftlite's losses."""
    generator = torch.Generator().manual_seed(0)
    num_prompts, num_negatives, tau, gamma = 3, 2, 0.3, 0.9
    pos = (-30 * torch.rand(num_prompts, generator=generator, dtype=torch.float64)).requires_grad_(True)
    neg = (-40 * torch.rand(num_prompts, num_negatives, generator=generator, dtype=torch.float64)).requires_grad_(True)
    pos_lengths = torch.tensor([10.0, 20.0, 15.0], dtype=torch.float64)
    neg_lengths = torch.tensor([[12.0, 30.0], [8.0, 9.0], [25.0, 16.0]], dtype=torch.float64)
    neg_ref = -50 * torch.rand(num_prompts, num_negatives, generator=generator, dtype=torch.float64)
    log_u_prev = torch.randn(num_prompts, generator=generator, dtype=torch.float64)
    loss, new_log_u, metrics = method_loss(method, pos, pos_lengths, neg, neg_lengths, tau=tau, beta=10.0,
                                           simpo_gamma_beta_ratio=0.5, sft_weight=sft_weight, log_u_prev=log_u_prev,
                                           gamma=torch.full((num_prompts,), gamma, dtype=torch.float64),
                                           neg_ref_logps=neg_ref)
    pos_grad, neg_grad = torch.autograd.grad(loss, (pos, neg))

    # brute force in float64: s and w per the paper, u_new = (1-γ)·u + γ·mean_j exp(w_ij)
    scale_pos, scale_neg = (pos_lengths, neg_lengths) if method == "dft2" else (1.0, 1.0)
    s_pos, s_neg = pos.detach() / scale_pos, neg.detach() / scale_neg
    w = s_neg / tau - (neg_ref if method == "dft" else 0.0)
    u_new = (1 - gamma) * log_u_prev.exp() + gamma * w.exp().mean(dim=1)
    nll = -pos.detach().sum() / pos_lengths.sum()
    expected_loss = (-s_pos + tau * u_new.log()).mean() + sft_weight * nll
    expected_pos = -1.0 / (num_prompts * torch.as_tensor(scale_pos, dtype=torch.float64)) - sft_weight / pos_lengths.sum()
    expected_neg = (w.exp() / (num_negatives * u_new[:, None])) / (num_prompts * torch.as_tensor(scale_neg, dtype=torch.float64))
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(new_log_u, u_new.log(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pos_grad, expected_pos.expand(num_prompts), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(neg_grad, expected_neg, rtol=1e-10, atol=1e-12)
    assert ("sft_nll" in metrics) is (sft_weight > 0)
