"""Memory-conscious sequence log-probs for causal LMs: the scores s(y) of DFT/DFT2.

A full forward materialises logits (N, T, V) and a log_softmax of the same size: for
N=8, T=2048 and V=152k that is ~10 GB in float32, most of the memory of a LoRA step.
Only the completion tokens matter, and of each row only the target entry and the
logsumexp. So we run the decoder trunk alone, gather the M hidden states that predict
completion tokens, and compute

    log P(t_m | h_m) = h_m·W[t_m] + b[t_m] - logsumexp_v(h_m·W[v] + b[v])

in (chunk_tokens, chunk_vocab) tiles with a streaming logsumexp, recomputing the
tiles in backward. Peak extra memory is one tile, not (M, V).

Not supported: models whose logits are not plain ``lm_head(h)``, i.e. final logit
soft-capping (Gemma 2/3) or logit scaling (Granite ``logits_scaling``, Cohere
``logit_scale``); these raise. Use ``naive_sequence_logprobs`` for them. LoRA on the
lm_head is refused for the same reason (its delta would be silently ignored).
The trunk is called directly, so peft methods that act in ``PeftModel.forward``
(prompt tuning) are not seen; LoRA, which patches the layers, is.
"""

import contextlib
import functools

import torch
from torch.autograd.function import once_differentiable


class ChunkedTargetLogProbs(torch.autograd.Function):
    """Target log-probs log_softmax(h·Wᵀ + b)[t] without an (M, V) tensor.

    Forward inputs: hidden (M, H), weight (V, H), bias (V,) or None, targets (M,) int64,
    chunk_tokens, chunk_vocab. Output: (M,) in float32 (float64 if hidden is float64).
    Saved for backward: the inputs and the per-row logsumexp (M,).

    Backward, with g the incoming (M,) gradient and P = softmax(h·Wᵀ + b):
        grad_h = g ⊙ (W[t] - P·W)                 (M, H)
        grad_W = (g ⊙ (onehot(t) - P))ᵀ · h       (V, H), only if weight needs grad
        grad_b = Σ_m g_m·(onehot(t_m) - P_m)      (V,),   only if bias needs grad
    Accumulated in the compute dtype and cast back to each input's dtype. Forward and backward
    run with autocast disabled, so both see the same float32 logits under any active autocast.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, chunk_vocab):
        # Autocast off: it would run the tile matmuls in bf16/fp16, so the saved logsumexp would come
        # from rounded logits while backward (outside autocast) recomputes them in float32, and
        # exp(logits - lse) would no longer sum to 1: wrong gradients for confident tokens.
        with torch.autocast(hidden.device.type, enabled=False):
            return ChunkedTargetLogProbs._forward(ctx, hidden, weight, bias, targets, chunk_tokens, chunk_vocab)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, chunk_tokens, chunk_vocab):
        compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
        num_rows = hidden.shape[0]
        target_logps = torch.empty(num_rows, dtype=compute_dtype, device=hidden.device)
        logsumexp = torch.empty(num_rows, dtype=compute_dtype, device=hidden.device)
        for row in range(0, num_rows, chunk_tokens):
            rows = slice(row, row + chunk_tokens)
            h = hidden[rows].to(compute_dtype)  # (m, H)
            t = targets[rows]  # (m,)
            running = torch.full((h.shape[0],), float("-inf"), dtype=compute_dtype, device=h.device)
            for col in range(0, weight.shape[0], chunk_vocab):
                logits = _tile_logits(h, weight, bias, col, chunk_vocab, compute_dtype)  # (m, v)
                running = torch.logaddexp(running, torch.logsumexp(logits, dim=1))
            # target logit from its own weight row: (m, H) rather than a search of the tiles
            target_logit = (h * weight[t].to(compute_dtype)).sum(dim=1)
            if bias is not None:
                target_logit = target_logit + bias[t].to(compute_dtype)
            target_logps[rows] = target_logit - running
            logsumexp[rows] = running
        ctx.save_for_backward(hidden, weight, bias, targets, logsumexp)
        ctx.chunks = (chunk_tokens, chunk_vocab)
        return target_logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        with torch.autocast(grad_output.device.type, enabled=False):  # the same float32 tiles as forward
            return ChunkedTargetLogProbs._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output):
        hidden, weight, bias, targets, logsumexp = ctx.saved_tensors
        chunk_tokens, chunk_vocab = ctx.chunks
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        compute_dtype = logsumexp.dtype
        grad_output = grad_output.to(compute_dtype)
        grad_hidden = torch.zeros_like(hidden, dtype=compute_dtype) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=compute_dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=compute_dtype) if need_bias else None
        for row in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(row, row + chunk_tokens)
            h = hidden[rows].to(compute_dtype)  # (m, H)
            t = targets[rows]  # (m,)
            g = grad_output[rows]  # (m,)
            lse = logsumexp[rows, None]  # (m, 1)
            # the onehot(t) part of the gradient
            if need_hidden:
                grad_hidden[rows] = g[:, None] * weight[t].to(compute_dtype)
            if need_weight:
                grad_weight.index_add_(0, t, g[:, None] * h)
            if need_bias:
                grad_bias.index_add_(0, t, g)
            # the -softmax part, one recomputed (m, v) tile at a time
            for col in range(0, weight.shape[0], chunk_vocab):
                cols = slice(col, col + chunk_vocab)
                logits = _tile_logits(h, weight, bias, col, chunk_vocab, compute_dtype)
                weighted_probs = g[:, None] * torch.exp(logits - lse)  # (m, v)
                if need_hidden:
                    grad_hidden[rows] -= weighted_probs @ weight[cols].to(compute_dtype)
                if need_weight:
                    grad_weight[cols] -= weighted_probs.T @ h
                if need_bias:
                    grad_bias[cols] -= weighted_probs.sum(dim=0)
        return (
            grad_hidden.to(hidden.dtype) if need_hidden else None,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
            None,
            None,
            None,
        )


def _tile_logits(h, weight, bias, col, chunk_vocab, compute_dtype):
    """(m, v) logits h·W[col:col+v]ᵀ + b in the compute dtype."""
    cols = slice(col, col + chunk_vocab)
    logits = h @ weight[cols].to(compute_dtype).T
    if bias is not None:
        logits = logits + bias[cols].to(compute_dtype)
    return logits


def chunked_target_logprobs(hidden, weight, targets, bias=None, chunk_tokens=1024, chunk_vocab=8192):
    """log_softmax(hidden·weightᵀ + bias)[targets], tiled; see ``ChunkedTargetLogProbs``.

    Args: hidden (M, H), weight (V, H), targets (M,) int64 in [0, V), bias (V,) or None.
    Returns: (M,) float32 (float64 for float64 hidden).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (M, H) and weight (V, H), got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if chunk_tokens < 1 or chunk_vocab < 1:
        raise ValueError(f"chunk sizes must be >= 1, got {chunk_tokens}, {chunk_vocab}")
    return ChunkedTargetLogProbs.apply(hidden, weight, bias, targets.long(), chunk_tokens, chunk_vocab)


def token_logprobs(model, input_ids, attention_mask, completion_mask, chunk_tokens=1024, chunk_vocab=8192):
    """Per-token log P(x_t | x_<t) at completion positions, without full logits.

    Args:
        model: a HF causal LM, possibly wrapped in a peft ``PeftModel``.
        input_ids: (N, T) int64.
        attention_mask: (N, T), 1 for real tokens.
        completion_mask: (N, T), 1 for completion (label) tokens; position 0 must be 0,
            as no hidden state predicts the first token.
    Returns:
        (N, T) float32; entry (n, t) is log P(input_ids[n, t] | input_ids[n, :t]) where
        completion_mask[n, t] is set, else 0.
    """
    completion_mask = completion_mask.bool()
    _check_masks(input_ids, attention_mask, completion_mask)
    trunk, lm_head = scoring_parts(model)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (N, T, H)
    # token t is predicted by the hidden state at t-1
    predicts = completion_mask[:, 1:]  # (N, T-1)
    hidden_rows = hidden[:, :-1][predicts]  # (M, H)
    targets = input_ids[:, 1:][predicts]  # (M,)
    row_logps = chunked_target_logprobs(
        hidden_rows, lm_head.weight, targets, getattr(lm_head, "bias", None), chunk_tokens, chunk_vocab
    )  # (M,)
    shifted = row_logps.new_zeros(predicts.shape).masked_scatter(predicts, row_logps)  # (N, T-1)
    return torch.cat([shifted.new_zeros(shifted.shape[0], 1), shifted], dim=1)


def scoring_parts(model):
    """(decoder trunk, lm_head) of a HF causal LM, possibly in a peft ``PeftModel``; refuses models whose
    logits are not plain lm_head(h) (see the module docstring)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _check_plain_lm_head(base)
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()  # e.g. LlamaForCausalLM.model


def sequence_logprobs(model, input_ids, attention_mask, completion_mask, chunk_tokens=1024, chunk_vocab=8192):
    """Summed completion log-probs log P(y|x) and completion lengths |y|.

    Shapes as ``token_logprobs``. Returns (logp_sums (N,) float32, token_counts (N,) int64).
    DFT2's per-token mean score is logp_sums / token_counts.
    """
    per_token = token_logprobs(model, input_ids, attention_mask, completion_mask, chunk_tokens, chunk_vocab)
    return per_token.sum(dim=1), completion_mask.bool().sum(dim=1)


@contextlib.contextmanager
def scoring_as_forward(module, scorer=sequence_logprobs):
    """Make `module(...)` compute `scorer(module, ...)` (`sequence_logprobs`, or a packed scorer).

    DDP syncs gradients only for forwards through its own __call__, and FSDP2 all-gathers the root's
    weights (embeddings, lm_head) only in hooks around the root's __call__, so a distributed model is
    called with scoring as its forward instead of being bypassed (single process: not used)."""
    saved = module.__dict__.get("forward")  # accelerate may have set an instance-level forward
    module.forward = functools.partial(scorer, module)
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def naive_sequence_logprobs(model, input_ids, attention_mask, completion_mask):
    """Reference: full (N, T, V) logits + log_softmax. Same outputs as ``sequence_logprobs``."""
    completion_mask = completion_mask.bool()
    _check_masks(input_ids, attention_mask, completion_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (N, T-1)
    predicts = completion_mask[:, 1:]
    return (logps * predicts).sum(dim=1), completion_mask.sum(dim=1)


def _check_masks(input_ids, attention_mask, completion_mask):
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids, attention_mask and completion_mask must all be (N, T), got {tuple(input_ids.shape)}, "
            f"{tuple(attention_mask.shape)}, {tuple(completion_mask.shape)}"
        )
    if bool(completion_mask[:, 0].any()):
        raise ValueError("completion_mask[:, 0] must be 0: no position predicts the first token")
    if bool((completion_mask & ~attention_mask.bool()).any()):
        raise ValueError("completion_mask marks tokens that attention_mask masks out (padding)")


# config attribute -> value meaning "logits are plain lm_head(h)"
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logits_scaling": 1.0, "logit_scale": 1.0}


def _check_plain_lm_head(base):
    for name, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(base.config, name, neutral)
        if value is not None and value != neutral:
            raise NotImplementedError(
                f"{type(base).__name__} transforms its logits (config.{name}={value}); chunked scoring "
                "assumes logits = lm_head(h). Use naive_sequence_logprobs for this model."
            )
    if hasattr(base.get_output_embeddings(), "base_layer"):
        raise NotImplementedError(
            "the lm_head is wrapped by an adapter (e.g. LoRA); chunked scoring would ignore its delta. "
            "Exclude lm_head from the adapter's target modules or use naive_sequence_logprobs."
        )
