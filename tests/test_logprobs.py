"""Tests for dftlite.logprobs: chunked scoring equals full logits + log_softmax.

Run: .venv/bin/python -m pytest tests/test_logprobs.py -q
Builds a tiny random Llama on CPU; nothing is downloaded.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from dftlite.logprobs import (
    chunked_target_logprobs,
    naive_sequence_logprobs,
    sequence_logprobs,
    token_logprobs,
)

SMALL_CHUNKS = dict(chunk_tokens=3, chunk_vocab=100)


def reference_target_logprobs(hidden, weight, targets, bias=None):
    logits = hidden.float() @ weight.float().T  # (M, V)
    if bias is not None:
        logits = logits + bias.float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def leaves(*shapes, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_(True) for shape in shapes]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunks", [(3, 5), (1, 1), (1000, 1000)])
def test_function_matches_log_softmax(with_bias, chunks):
    hidden, weight, bias = leaves((7, 5), (23, 5), (23,))
    bias = bias if with_bias else None
    targets = torch.tensor([0, 22, 5, 5, 17, 3, 11])
    upstream = torch.randn(7, generator=torch.Generator().manual_seed(1))
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    got = chunked_target_logprobs(hidden, weight, targets, bias, chunk_tokens=chunks[0], chunk_vocab=chunks[1])
    got_grads = torch.autograd.grad((got * upstream).sum(), inputs)
    expected = reference_target_logprobs(hidden, weight, targets, bias)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    hidden, weight, bias = leaves((4, 3), (6, 3), (6,), dtype=torch.float64)
    targets = torch.tensor([5, 0, 2, 2])
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_target_logprobs(h, w, targets, b, chunk_tokens=3, chunk_vocab=4),
        (hidden, weight, bias),
    )


def test_frozen_weight_gets_no_grad():
    hidden, weight = leaves((5, 4), (9, 4))
    weight.requires_grad_(False)
    targets = torch.tensor([1, 8, 0, 3, 3])
    chunked_target_logprobs(hidden, weight, targets, chunk_tokens=2, chunk_vocab=4).sum().backward()
    assert weight.grad is None
    expected = torch.autograd.grad(reference_target_logprobs(hidden, weight, targets).sum(), hidden)[0]
    torch.testing.assert_close(hidden.grad, expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_inputs_compute_in_float32():
    hidden, weight = leaves((6, 8), (30, 8), dtype=torch.bfloat16)
    targets = torch.tensor([0, 29, 4, 4, 13, 7])
    got = chunked_target_logprobs(hidden, weight, targets, chunk_tokens=4, chunk_vocab=7)
    assert got.dtype == torch.float32
    # bf16 inputs, float32 arithmetic: matches the float32 reference on the same values
    torch.testing.assert_close(got, reference_target_logprobs(hidden, weight, targets), atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_empty_selection():
    hidden, weight = leaves((0, 4), (9, 4))
    got = chunked_target_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert got.shape == (0,)


# --- whole model ------------------------------------------------------------------------


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        # larger than the default 0.02 so that logits are far from uniform and gradients
        # are large enough for an absolute tolerance of 1e-5 to mean something
        initializer_range=0.5,
    )
    model = LlamaForCausalLM(config).float()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def batch():
    """Right-padded (N=3, T=10) batch with completions of uneven length (5, 3, 0 tokens)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 1000, (3, 10), generator=generator)
    lengths = torch.tensor([10, 7, 4])
    positions = torch.arange(10)
    attention_mask = (positions < lengths[:, None]).long()
    prompt_lengths = torch.tensor([5, 4, 4])
    completion_mask = ((positions >= prompt_lengths[:, None]) & attention_mask.bool()).long()
    input_ids = input_ids * attention_mask  # pad id 0
    return input_ids, attention_mask, completion_mask


def scores_and_grads(model, score_fn, **kwargs):
    input_ids, attention_mask, completion_mask = batch()
    model.zero_grad(set_to_none=True)
    logp_sums, token_counts = score_fn(model, input_ids, attention_mask, completion_mask, **kwargs)
    # distinct coefficients per sequence so that mixing up rows would show in the grads
    (logp_sums * torch.tensor([1.0, -0.7, 0.3])).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return logp_sums.detach(), token_counts, grads


@pytest.mark.parametrize("chunks", [SMALL_CHUNKS, {}])
def test_sequence_logprobs_match_naive(chunks):
    model = tiny_llama()
    got, counts, got_grads = scores_and_grads(model, sequence_logprobs, **chunks)
    expected, expected_counts, expected_grads = scores_and_grads(model, naive_sequence_logprobs)
    assert counts.tolist() == expected_counts.tolist() == [5, 3, 0]
    assert got[2].item() == 0.0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert got_grads["model.embed_tokens.weight"].abs().max() > 1e-2  # tied lm_head path is exercised


def test_token_logprobs_are_placed_at_their_tokens():
    model = tiny_llama()
    input_ids, attention_mask, completion_mask = batch()
    with torch.no_grad():
        per_token = token_logprobs(model, input_ids, attention_mask, completion_mask, **SMALL_CHUNKS)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    expected = torch.log_softmax(logits[0, 6], dim=-1)[input_ids[0, 7]]  # token 7 predicted at 6
    assert per_token[0, 7].item() == pytest.approx(expected.item(), abs=1e-5)
    assert (per_token[completion_mask == 0] == 0).all() and (per_token[completion_mask == 1] < 0).all()


def test_lora_model_matches_naive_and_trains_adapters():
    model = tiny_llama()
    # init_lora_weights=False: random B as well as A, so both get nonzero grads
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    got, _, got_grads = scores_and_grads(model, sequence_logprobs, **SMALL_CHUNKS)
    expected, _, expected_grads = scores_and_grads(model, naive_sequence_logprobs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got_grads and all("lora_" in name for name in got_grads)
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)
        assert grad.abs().max() > 0, name


def test_rejects_transformed_logits_and_bad_masks():
    model = tiny_llama()
    input_ids, attention_mask, completion_mask = batch()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        sequence_logprobs(model, input_ids, attention_mask, completion_mask)
    model.config.final_logit_softcapping = None
    first_token = completion_mask.clone()
    first_token[0, 0] = 1
    with pytest.raises(ValueError, match="first token"):
        sequence_logprobs(model, input_ids, attention_mask, first_token)
    on_padding = completion_mask.clone()
    on_padding[2, 9] = 1
    with pytest.raises(ValueError, match="padding"):
        sequence_logprobs(model, input_ids, attention_mask, on_padding)
