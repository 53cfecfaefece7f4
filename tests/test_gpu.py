"""GPU-only checks: chunked scoring under CUDA autocast, the 4-bit sampler view after training on CUDA,
and the CUDA memory of chunked against naive scoring.

Run on a machine with CUDA (benchmarks/gpu_check.py runs exactly these as its stage 2):

    .venv/bin/python -m pytest -q -m gpu tests/test_gpu.py

Without CUDA every test here is skipped (not failed), so `make test` stays green on a CPU.
Nothing is downloaded: the models are the tiny random Llama of conftest.py and a stub head.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dftlite.logprobs import chunked_target_logprobs, naive_sequence_logprobs, sequence_logprobs
from dftlite.models import ModelConfig, load_model, sampler_view
from test_models import _train_a_few_steps

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def float64_reference(hidden, weight, targets):
    """log_softmax(h·Wᵀ)[t] in float64 from the same float32 values: the exact answer to ~1e-15."""
    logits = hidden.double() @ weight.double().T  # (M, V)
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_chunked_scoring_under_cuda_autocast_matches_float64(autocast_dtype):
    # M=96 rows, V=5000 in 1024-wide tiles (the last one ragged), H=256; logits of size ~±10, so a bf16
    # matmul (8 mantissa bits) would be off by ~0.05 and an fp16 one by ~5e-3: far outside 1e-4.
    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(96, 256, generator=generator) * 0.6).cuda().requires_grad_()  # (M, H) float32 leaf
    weight = (torch.randn(5000, 256, generator=generator) * 0.6).cuda().requires_grad_()  # (V, H) float32 leaf
    targets = torch.randint(0, 5000, (96,), generator=generator).cuda()
    upstream = torch.randn(96, generator=generator).cuda()  # distinct per-row weights, so row mix-ups show

    with torch.autocast("cuda", dtype=autocast_dtype):  # the forward, as under Trainer's bf16/fp16 mixed precision
        got = chunked_target_logprobs(hidden, weight, targets, chunk_tokens=32, chunk_vocab=1024)
    got_grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight))  # backward outside, as Trainer does
    expected = float64_reference(hidden, weight, targets)
    expected_grads = torch.autograd.grad((expected * upstream.double()).sum(), (hidden, weight))

    assert got.dtype == torch.float32, "the scorer computes in float32 whatever autocast is active"
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_grad.double(), expected_grad.double(), atol=1e-4, rtol=1e-4)


def test_4bit_sampler_view_is_bit_exact_after_training_on_cuda(tiny_model_dir):
    """Training the adapter leaves the 4-bit base that sampler_view exposes untouched, bit for bit.
    (A separately loaded base is no reference: k-bit preparation keeps norms and head in float32.)"""
    pytest.importorskip("bitsandbytes")
    config = ModelConfig(model_name_or_path=str(tiny_model_dir), precision="4bit", lora_r=4, lora_dropout=0.1)
    model, tokenizer = load_model(config)
    assert model.device.type == "cuda"
    input_ids = tokenizer(["Natalia sold 48 clips in April."], return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad(), sampler_view(model):
        expected = model(input_ids=input_ids).logits

    changed = _train_a_few_steps(model, input_ids)
    assert changed and all(changed), "every LoRA parameter should move"
    with torch.no_grad():
        adapted = model(input_ids=input_ids).logits
        with sampler_view(model):
            base = model(input_ids=input_ids).logits
    assert torch.equal(base, expected), "sampler_view must be the 4-bit base model bit for bit"
    assert not torch.allclose(adapted, expected), "the trained adapter must change the logits"


def test_chunked_scoring_peak_cuda_memory_is_below_naive():
    # benchmarks/logprob_memory.py's head case: N=12 sequences of T=512, the last 256 tokens scored,
    # SmolLM2-135M's head (V=49152, H=576). Naive scoring holds (N, T, V) float32 logits; chunked never does.
    sys.path.insert(0, str(REPO / "benchmarks"))
    import logprob_memory as bench

    full_logits_mib = bench.NUM_SEQUENCES * bench.SEQ_LEN * bench.VOCAB * 4 / 2**20  # 1152 MiB, by hand
    naive = bench.measure_one("head", "naive")
    chunked = bench.measure_one("head", "chunked")
    assert naive["peak_mib"] >= full_logits_mib, "the naive side must hold the full logits (measurement check)"
    assert chunked["peak_mib"] < full_logits_mib / 4
    assert chunked["checksum"] == pytest.approx(naive["checksum"], rel=1e-4)


def test_sequence_logprobs_on_cuda_match_naive(tiny_model_dir):
    # the whole-model path on CUDA (trunk, gather, tiles) against full logits, float32, no autocast
    config = ModelConfig(model_name_or_path=str(tiny_model_dir), precision="fp32", lora_r=0)
    model, tokenizer = load_model(config)
    input_ids = tokenizer(["How many clips did Natalia sell altogether?"], return_tensors="pt")["input_ids"].cuda()
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, 4:] = 1
    with torch.no_grad():
        got, counts = sequence_logprobs(model, input_ids, attention_mask, completion_mask, chunk_tokens=3, chunk_vocab=50)
        expected, expected_counts = naive_sequence_logprobs(model, input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(counts, expected_counts)
