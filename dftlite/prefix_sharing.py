"""Prefix-shared scoring: each prompt computed once for its 1+B answers.

A DFT step scores prompt x_i with 1+B answers. Scored one sequence per row (`logprobs.sequence_logprobs`),
every row carries its own copy of x_i through the trunk, forward and backward. Here a group is one
packed row instead,

    [x_i, y_i0, y_i1, ..., y_iB, pad...]     position ids  0..P-1, P..P+L_0-1, P..P+L_1-1, ...

under a block attention mask: the prompt is causal in itself, answer j sees the prompt and its own
earlier tokens, never another answer. With the position ids restarting at P for every answer, each
answer's hidden states are those of the row [x_i, y_ij] up to rounding, and answer j's first token is
predicted by the prompt's last hidden state, shared by all answers. So the log-probs, and their
gradients, equal the unshared path's; the prompt's tokens are computed once instead of 1+B times.
Padding queries attend to themselves only: a fully masked row would be NaN under SDPA.

Why a packed row and not the prompt's KV cache expanded over the group: the packed row is one plain
forward, so gradient checkpointing (which recomputes a layer and would append to a cache twice) and
DDP see nothing unusual; the cost is a (T, T) mask for T = P + Σ L_j, attention over it (quadratic,
mostly masked), which on the models here is small beside the projections and MLPs the prompt no
longer repeats (docs/benchmarks.md, "Prefix-shared scoring").

Needs an architecture that takes a custom 4D mask and position ids: transformers' attention interface
with eager or SDPA attention, no sliding window. `sharing_problem` says why a model cannot;
the trainer then scores unshared and says so.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from dftlite.logprobs import chunked_target_logprobs, scoring_parts


@dataclass
class PackedGroups:
    """G groups as G packed rows of width T; N = Σ_g (1+B_g) answers, M completion tokens in all."""

    input_ids: torch.Tensor  # (G, T) int64, pad_id after each row's end
    position_ids: torch.Tensor  # (G, T) int64: prompt 0..P-1, each answer from P
    attention_mask: torch.Tensor  # (G, 1, T, T) bool, True: query may attend to key
    predictors: torch.Tensor  # (M,) int64: flat index into (G*T) of the hidden state predicting each completion token
    targets: torch.Tensor  # (M,) int64: the completion tokens
    sequences: torch.Tensor  # (M,) int64: which of the N answers each token belongs to (groups in order, positive first)
    lengths: torch.Tensor  # (N,) int64: completion lengths

    def tensors(self) -> tuple:
        return (self.input_ids, self.position_ids, self.attention_mask, self.predictors, self.targets, self.sequences,
                self.lengths)


def pack_groups(groups, pad_id: int, device) -> PackedGroups:
    """One row per group (`draws.Group`: prompt_ids, completions), as described in the module docstring."""
    width = max(len(g.prompt_ids) + sum(len(c) for c in g.completions) for g in groups)
    input_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long)
    segments = torch.full((len(groups), width), -1, dtype=torch.long)  # -1 padding, 0 prompt, j+1 answer j
    predictors, targets, sequences, lengths = [], [], [], []
    for row, group in enumerate(groups):
        prompt_length = len(group.prompt_ids)
        if prompt_length == 0:
            raise ValueError(f"group {group.example_id}: empty prompt; no hidden state predicts the first answer token")
        input_ids[row, :prompt_length] = torch.tensor(group.prompt_ids)
        position_ids[row, :prompt_length] = torch.arange(prompt_length)
        segments[row, :prompt_length] = 0
        start = prompt_length
        for j, completion in enumerate(group.completions):
            length = len(completion)
            end = start + length
            input_ids[row, start:end] = torch.tensor(completion, dtype=torch.long)
            position_ids[row, start:end] = torch.arange(prompt_length, prompt_length + length)
            segments[row, start:end] = j + 1
            # token k of the answer is predicted by the answer's token k-1, token 0 by the prompt's last token
            predicting = torch.arange(start - 1, end - 1)
            predicting[:1] = prompt_length - 1
            predictors.append(row * width + predicting)
            targets.append(torch.tensor(completion, dtype=torch.long))
            sequences.append(torch.full((length,), len(lengths), dtype=torch.long))
            lengths.append(length)
            start = end
    query, key = segments[:, :, None], segments[:, None, :]  # (G, T, 1), (G, 1, T)
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (T, T)
    visible = causal & (query >= 0) & ((key == 0) | (key == query))  # prompt keys, or the query's own answer
    visible |= torch.eye(width, dtype=torch.bool)  # padding queries see themselves: no fully masked row
    return PackedGroups(
        input_ids.to(device), position_ids.to(device), visible[:, None].to(device), torch.cat(predictors).to(device),
        torch.cat(targets).to(device), torch.cat(sequences).to(device), torch.tensor(lengths, dtype=torch.long).to(device),
    )


def shared_prompt_logprobs(model, input_ids, position_ids, attention_mask, predictors, targets, sequences, lengths,
                           chunk_tokens=1024, chunk_vocab=8192):
    """Summed completion log-probs (N,) float32 and lengths (N,) int64 of packed groups (`pack_groups`'s tensors).

    The same outputs as `logprobs.sequence_logprobs` on the groups' unshared rows (`draws.pad_groups`)."""
    trunk, lm_head = scoring_parts(model)
    if trunk.config._attn_implementation == "eager":  # eager adds the mask to the scores; SDPA takes it as bool
        dtype = next(trunk.parameters()).dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        attention_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
            ~attention_mask, torch.finfo(dtype).min)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).last_hidden_state  # (G, T, H)
    rows = hidden.flatten(0, 1)[predictors]  # (M, H)
    token_logps = chunked_target_logprobs(rows, lm_head.weight, targets, getattr(lm_head, "bias", None), chunk_tokens,
                                          chunk_vocab)  # (M,)
    sums = token_logps.new_zeros(lengths.shape[0]).index_add(0, sequences, token_logps)  # (N,)
    return sums, lengths


def sharing_problem(model) -> str | None:
    """Why `model` cannot score packed groups exactly, or None when it can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    trunk = getattr(base, base.base_model_prefix, None)
    if trunk is None:
        return f"{type(base).__name__} has no decoder trunk at .{base.base_model_prefix}"
    config = trunk.config
    implementation = config._attn_implementation
    if implementation not in ("eager", "sdpa"):
        return f"attention implementation {implementation!r} takes no custom 4D mask (eager or sdpa do)"
    if not getattr(trunk, "_supports_attention_backend", False):
        return f"{type(trunk).__name__} does not use transformers' attention interface (custom 4D masks)"
    if getattr(config, "sliding_window", None) is not None or "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return "sliding-window attention: a block mask would override the window"
    if "position_ids" not in inspect.signature(trunk.forward).parameters:
        return f"{type(trunk).__name__} takes no position ids"
    return None
