"""Losses for Discriminative Fine-Tuning (DFT, DFT2) and the baselines it is compared with.

The paper: Guo et al., ICML 2025, arXiv 2502.18679; equation numbers below are its.

Every function is pure: sequence scores in, ``(loss, metrics)`` out (DFT ones also
return the updated moving-average state ``new_log_u``). Nothing here knows about a
model, a trainer or a config. Shapes: S prompts in the mini-batch, B negatives each.
``method_loss`` picks a method's loss by name, as `dftlite train` does for each micro-batch.

DFT objective for prompt i with positive y_i and negatives y'_ij ~ P_g0(.|x̄_i):

    F_i = -s_i + τ·log g_i                                           (eq. 6)
    DFT : s = log P_g(y|x),        g_i = E_y'[exp(s(y')/τ) / P_g0(y'|x̄_i)]
    DFT2: s = log P_g(y|x) / |y|,  g_i = E_y'[exp(s(y')/τ)]

estimated from the B negatives in log space, w_ij = s_ij/τ - log P_g0(y'_ij|x̄_i)
(DFT) or w_ij = s_ij/τ (DFT2):

    log ĝ_i = logmeanexp_j w_ij
    u_i ← (1-γ)·u_i + γ·ĝ_i                                          (eq. 10)
    ∇F_i ≈ -∇s_i + Σ_j exp(w_ij - log u_i)/B · ∇s_ij                 (eq. 8 / eq. 13)

Precision: the detached quantities (w, log ĝ, log u and the weights) are computed in
float64. With log-probs near -1e4 and τ = 0.3, |w| reaches ~3e4, where float32's
spacing (~2e-3) would put a relative error of that size on every weight exp(w - log u);
at [S, B] sizes float64 costs nothing. The returned loss has the scores' dtype,
promoted to at least float32.
"""

import math

import torch
import torch.nn.functional as F


def update_log_u(log_u_prev, log_g_hat, gamma):
    """Moving-average estimator of g (eq. 10), kept in log space.

    u_new = (1-γ)·u_prev + γ·ĝ, i.e.
    log u_new = logaddexp(log(1-γ) + log u_prev, log γ + log ĝ).

    Args:
        log_u_prev: (S,) log u_i before this step.
        log_g_hat: (S,) mini-batch estimate log ĝ_i.
        gamma: float or (S,) tensor in (0, 1]. γ = 1 is the plain mini-batch
            estimator and returns ``log_g_hat`` exactly.
    Returns:
        (S,) log u_new, in ``log_g_hat``'s dtype and device.
    """
    log_u_prev = log_u_prev.to(log_g_hat)
    if log_u_prev.shape != log_g_hat.shape or log_g_hat.dim() != 1:
        raise ValueError(
            f"log_u_prev {tuple(log_u_prev.shape)} and log_g_hat {tuple(log_g_hat.shape)} "
            "must both have shape (S,)"
        )
    gamma = _gamma_tensor(gamma, log_g_hat)
    mixed = torch.logaddexp(torch.log1p(-gamma) + log_u_prev, torch.log(gamma) + log_g_hat)
    # γ = 1: log(1-γ) = -inf; select log ĝ explicitly so the result is exact
    # and cannot become NaN if log_u_prev is ever ±inf.
    return torch.where(gamma == 1.0, log_g_hat, mixed)


def dft_loss(pos_scores, neg_scores, neg_ref_logps, log_u_prev, tau=1.0, gamma=0.85):
    """DFT loss (Setting 1; eqs. 6-8, 10) with s = log P_g(y|x), summed over tokens.

    Args:
        pos_scores: (S,) s_i = log P_g(y_i|x_i) of the positives (with grad).
        neg_scores: (S, B) s_ij = log P_g(y'_ij|x_i) of the negatives (with grad).
        neg_ref_logps: (S, B) log P_g0(y'_ij|x̄_i) under the frozen sampler; constant.
        log_u_prev: (S,) log u_i from the estimator table.
        tau: temperature τ > 0.
        gamma: moving-average rate, float or (S,) tensor in (0, 1].
    Returns:
        loss: scalar surrogate, mean_i[-s_i + τ·log u_new_i]; its gradient is eq. (8).
        new_log_u: (S,) float64, detached; write it back to the table.
        metrics: dict of 0-dim detached tensors, see ``_discriminative_loss``.
    """
    if neg_ref_logps is None:
        raise ValueError("dft_loss needs neg_ref_logps; use dft2_loss for the estimator without P_g0")
    return _discriminative_loss(pos_scores, neg_scores, neg_ref_logps, log_u_prev, tau, gamma)


def dft2_loss(pos_scores, neg_scores, log_u_prev, tau=0.3, gamma=0.9):
    """DFT2 loss (eqs. 11-13, 10) with s = log P_g(y|x)/|y|, the per-token mean.

    Same as ``dft_loss`` but g_i = E[exp(s(y')/τ)] has no 1/P_g0 importance weight,
    so w_ij = s_ij/τ. Shapes: pos_scores (S,), neg_scores (S, B), log_u_prev (S,).
    Returns ``(loss, new_log_u, metrics)``; the gradient of ``loss`` is eq. (13).
    """
    return _discriminative_loss(pos_scores, neg_scores, None, log_u_prev, tau, gamma)


def _discriminative_loss(pos_scores, neg_scores, neg_ref_logps, log_u_prev, tau, gamma):
    """Shared body of DFT and DFT2; ``neg_ref_logps=None`` selects DFT2.

    surrogate_i = -s_i + τ·log u_new_i + Σ_j p_ij·(s_ij - s_ij.detach()),
    p_ij = exp(w_ij - log u_new_i)/B, detached.
    The last term is zero in value, so the loss equals the objective estimate, and its
    gradient is p_ij·∇s_ij, i.e. eq. (8)/(13) with the updated u in the denominator.

    Metrics (0-dim detached tensors, so that logging them forces no device sync):
        sft_part: mean_i -s_i.   neg_part: mean_i τ·log u_new_i.
        log_u_mean: mean_i log u_new_i.   log_g_hat_mean: mean_i log ĝ_i.
        weight_max, weight_mean: of B·p_ij = exp(w_ij - log u_new_i); 1.0 is uniform.
        weight_entropy: mean_i entropy (nats) of softmax_j w_ij; log B is uniform.
    """
    if pos_scores.dim() != 1 or neg_scores.dim() != 2 or neg_scores.shape[0] != pos_scores.shape[0]:
        raise ValueError(
            f"expected pos_scores (S,) and neg_scores (S, B), got {tuple(pos_scores.shape)} "
            f"and {tuple(neg_scores.shape)}"
        )
    num_prompts, num_negatives = neg_scores.shape
    if num_prompts == 0 or num_negatives == 0:
        raise ValueError(f"need at least one prompt and one negative, got S={num_prompts}, B={num_negatives}")
    if log_u_prev.shape != (num_prompts,):
        raise ValueError(f"log_u_prev must have shape ({num_prompts},), got {tuple(log_u_prev.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")

    # (S, B) log-weights; detached: they only scale gradients, never carry them.
    log_w = neg_scores.detach().double() / tau
    if neg_ref_logps is not None:
        if neg_ref_logps.shape != neg_scores.shape:
            raise ValueError(
                f"neg_ref_logps must match neg_scores {tuple(neg_scores.shape)}, got {tuple(neg_ref_logps.shape)}"
            )
        # importance weight 1/P_g0(y'|x̄): negatives come from the sampler, not from P_g
        log_w = log_w - neg_ref_logps.detach().to(log_w)
    log_g_hat = torch.logsumexp(log_w, dim=1) - math.log(num_negatives)  # (S,)
    # detach: u is a running estimate, not a gradient path
    new_log_u = update_log_u(log_u_prev.detach(), log_g_hat, gamma)  # (S,)
    rel_weights = torch.exp(log_w - new_log_u[:, None])  # (S, B) B·p_ij
    neg_weights = rel_weights / num_negatives  # (S, B) p_ij

    pos = pos_scores.double()
    neg = neg_scores.double()
    surrogate = -pos + tau * new_log_u + (neg_weights * (neg - neg.detach())).sum(dim=1)  # (S,)
    out_dtype = torch.promote_types(pos_scores.dtype, torch.float32)
    loss = surrogate.mean().to(out_dtype)

    softmax_w = torch.softmax(log_w, dim=1)  # (S, B) weights normalised per prompt
    entropy = -(softmax_w * torch.log_softmax(log_w, dim=1)).sum(dim=1)
    metrics = {
        "sft_part": -pos.detach().mean(),
        "neg_part": (tau * new_log_u).mean(),
        "log_u_mean": new_log_u.mean(),
        "log_g_hat_mean": log_g_hat.mean(),
        "weight_max": rel_weights.max(),
        "weight_mean": rel_weights.mean(),
        "weight_entropy": entropy.mean(),
    }
    return loss, new_log_u, metrics


def _gamma_tensor(gamma, like):
    """γ as a (S,) tensor like ``like``, checked to lie in (0, 1]."""
    if isinstance(gamma, (int, float)):
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
        return torch.full_like(like, float(gamma))
    gamma = torch.as_tensor(gamma).to(like)
    if gamma.dim() == 0:
        gamma = gamma.expand_as(like)
    if gamma.shape != like.shape:
        raise ValueError(f"gamma must be a float or have shape {tuple(like.shape)}, got {tuple(gamma.shape)}")
    if not bool(((gamma > 0) & (gamma <= 1)).all()):
        raise ValueError("every gamma must lie in (0, 1]")
    return gamma


# ---------------------------------------------------------------------------
# Baselines on the same self-play data (paper Table 2). Conventions:
#   pos_logps (S,) summed log-probs of the positives, pos_lengths (S,) token counts,
#   neg_logps (S, B) summed log-probs of the negatives, neg_lengths (S, B).
# Pairwise losses treat every (positive i, negative ij) as one pair and average over
# all S·B pairs.
# ---------------------------------------------------------------------------


def sft_loss(pos_logps, pos_lengths):
    """Token-level NLL: -Σ_i log P(y_i|x_i) / Σ_i |y_i|.

    Args: pos_logps (S,), pos_lengths (S,). Returns (loss, {"sft_nll"}).
    """
    loss = -pos_logps.sum() / pos_lengths.sum().clamp_min(1).to(pos_logps.dtype)
    return loss, {"sft_nll": loss.detach()}


def simpo_loss(pos_logps, pos_lengths, neg_logps, neg_lengths, beta=10.0, gamma_beta_ratio=0.5):
    """SimPO (Meng et al., 2024): -log σ(β·(s_w/|y_w| - s_l/|y_l|) - γ), γ = ratio·β.

    The paper's Appendix A.2 searches β ∈ {6, 8, 10, 12} with γ/β = 0.5.
    Args: pos_logps (S,), pos_lengths (S,), neg_logps (S, B), neg_lengths (S, B).
    Returns (loss, metrics) with reward_margin = mean β·(r_w - r_l) (without γ) and
    reward_accuracy = fraction of pairs with r_w > r_l.
    """
    chosen_rewards = beta * pos_logps / pos_lengths.to(pos_logps.dtype)  # (S,)
    rejected_rewards = beta * neg_logps / neg_lengths.to(neg_logps.dtype)  # (S, B)
    margins = chosen_rewards[:, None] - rejected_rewards  # (S, B)
    loss = -F.logsigmoid(margins - gamma_beta_ratio * beta).mean()
    return loss, _pair_metrics(chosen_rewards, rejected_rewards, margins)


def dpo_loss(pos_logps, neg_logps, ref_pos_logps, ref_neg_logps, beta=0.1):
    """DPO: -log σ(β·((π_w - ref_w) - (π_l - ref_l))) over all (i, j) pairs.

    With negatives drawn from the base model this is SPIN (Chen et al., 2024);
    the paper searches β ∈ {0.01, 0.05, 0.1}.
    Args: pos_logps (S,), neg_logps (S, B) under the policy; ref_pos_logps (S,),
    ref_neg_logps (S, B) under the frozen reference (detached here).
    Returns (loss, metrics) with reward_margin and reward_accuracy.
    """
    chosen_rewards = beta * (pos_logps - ref_pos_logps.detach())  # (S,)
    rejected_rewards = beta * (neg_logps - ref_neg_logps.detach())  # (S, B)
    margins = chosen_rewards[:, None] - rejected_rewards  # (S, B)
    # logsigmoid, not log(sigmoid()): stays finite for margins of any size
    loss = -F.logsigmoid(margins).mean()
    return loss, _pair_metrics(chosen_rewards, rejected_rewards, margins)


def _pair_metrics(chosen_rewards, rejected_rewards, margins):
    return {
        "reward_chosen": chosen_rewards.detach().mean(),
        "reward_rejected": rejected_rewards.detach().mean(),
        "reward_margin": margins.detach().mean(),
        "reward_accuracy": (margins.detach() > 0).float().mean(),
    }


# ---------------------------------------------------------------------------
# One method's loss by name: what `dftlite train` computes for each micro-batch.
# ---------------------------------------------------------------------------


def method_loss(method, pos_logps, pos_lengths, neg_logps, neg_lengths, *, tau, beta, simpo_gamma_beta_ratio,
                sft_weight, log_u_prev=None, gamma=None, neg_ref_logps=None, ref_pos_logps=None, ref_neg_logps=None,
                group_share=1.0, token_share=1.0):
    """The loss of `method` (dft2, dft, sft, simpo, simpo_sft or dpo) on S prompts with B negatives each.

        loss = group_share·L_method + sft_weight·token_share·NLL          (NLL: ``sft_loss``)

    L_method is the per-prompt mean of ``dft2_loss`` (scores: per-token means), ``dft_loss``
    (scores: sums), ``simpo_loss`` or ``dpo_loss``; sft is token_share·NLL alone. The SFT anchor
    term is added for dft and dft2 when sft_weight (λ) > 0, and always for simpo_sft (SimPO + λ·SFT).
    A step cut into micro-batches sums their losses, so each term carries the micro-batch's share of
    what the step averages over: group_share = its prompts / the step's, token_share = its positive
    tokens / the step's. One micro-batch is the whole step: both 1.

    Args:
        pos_logps (S,), pos_lengths (S,): summed log-probs and token counts of the positives.
        neg_logps (S, B), neg_lengths (S, B): the same of the negatives.
        tau, beta, simpo_gamma_beta_ratio, sft_weight: the settings; each method reads its own.
        log_u_prev (S,), gamma (float or (S,)): the u state (dft, dft2).
        neg_ref_logps (S, B): log P_g0 of the negatives (dft).
        ref_pos_logps (S,), ref_neg_logps (S, B): scores under the frozen reference (dpo).
    Returns:
        (loss, new_log_u: (S,) float64 for dft and dft2, else None, metrics).
    """
    new_log_u = None
    if method == "dft2":
        loss, new_log_u, metrics = dft2_loss(pos_logps / pos_lengths, neg_logps / neg_lengths, log_u_prev, tau, gamma)
    elif method == "dft":
        loss, new_log_u, metrics = dft_loss(pos_logps, neg_logps, neg_ref_logps, log_u_prev, tau, gamma)
    elif method == "sft":
        loss, metrics = sft_loss(pos_logps, pos_lengths)
        return loss * token_share, None, metrics
    elif method == "dpo":
        loss, metrics = dpo_loss(pos_logps, neg_logps, ref_pos_logps, ref_neg_logps, beta)
    elif method in ("simpo", "simpo_sft"):
        loss, metrics = simpo_loss(pos_logps, pos_lengths, neg_logps, neg_lengths, beta, simpo_gamma_beta_ratio)
        if method == "simpo_sft":
            metrics["simpo"] = loss.detach()
    else:
        raise ValueError(f"unknown method {method!r}")
    loss = loss * group_share
    if method == "simpo_sft" or (sft_weight and method in ("dft", "dft2")):
        sft, sft_metrics = sft_loss(pos_logps, pos_lengths)  # token-level over the step's positives, like sft
        loss, metrics = loss + sft_weight * sft * token_share, {**metrics, **sft_metrics}
    return loss, new_log_u, metrics
