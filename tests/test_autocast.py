"""Chunked scoring under autocast (bf16 and fp16, on CPU): forward and backward must see the same logits.

Run: .venv/bin/python -m pytest tests/test_autocast.py -q
Under autocast the trunk hands over bf16/fp16 hidden states; the lm_head tiles must still be computed
in float32 in forward and in backward, or exp(logits - lse) stops summing to 1 and the gradient of
confident tokens points the wrong way. The reference is float64 log_softmax on the same (rounded)
hidden states; the bar is naive log_softmax under the same autocast.
"""

import pytest
import torch

from dftlite.logprobs import chunked_target_logprobs

NUM_TOKENS, VOCAB, HIDDEN = 256, 4000, 64


def _problem(confident_share: float, dtype: torch.dtype, seed: int = 0):
    """Hidden states (M, H) in the autocast dtype, as a trunk under autocast returns them, and an lm_head
    (V, H) in float32, with logits around 15 and `confident_share` of targets at p > 0.9."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) / HIDDEN**0.5
    hidden = 15.0 * torch.randn(NUM_TOKENS, HIDDEN, generator=generator) / HIDDEN**0.5
    targets = torch.randint(0, VOCAB, (NUM_TOKENS,), generator=generator)
    confident = torch.rand(NUM_TOKENS, generator=generator) < confident_share
    # push the confident rows' hidden states towards their target's row: the target dominates the softmax
    hidden[confident] += 6.0 * weight[targets[confident]] * HIDDEN**0.5 / weight[targets[confident]].norm(dim=1, keepdim=True)
    hidden = hidden.to(dtype).requires_grad_(True)
    return hidden, weight.requires_grad_(True), targets


def _gradients(score, hidden, weight, targets, upstream):
    hidden.grad = weight.grad = None
    (score(hidden, weight, targets) * upstream).sum().backward()
    return torch.cat([hidden.grad.double().flatten(), weight.grad.double().flatten()])


def _naive(hidden, weight, targets):
    return torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("confident_share", [0.0, 0.13])
def test_gradient_under_autocast_at_least_as_close_as_naive(dtype, confident_share):
    hidden, weight, targets = _problem(confident_share, dtype)
    upstream = torch.randn(NUM_TOKENS, generator=torch.Generator().manual_seed(1))
    # float64 truth on the very values the scorer sees
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    truth = _gradients(_naive, h64, w64, targets, upstream.double())
    if confident_share:  # the problem is what it says it is
        probs = torch.softmax(h64.detach() @ w64.detach().T, dim=-1).gather(1, targets[:, None]).squeeze(1)
        assert (probs > 0.9).float().mean() > 0.05
    with torch.autocast("cpu", dtype=dtype):
        chunked = _gradients(lambda h, w, t: chunked_target_logprobs(h, w, t, chunk_tokens=64, chunk_vocab=1000),
                             hidden, weight, targets, upstream)
        naive = _gradients(_naive, hidden, weight, targets, upstream)
    chunked_error = ((chunked - truth).norm() / truth.norm()).item()
    naive_error = ((naive - truth).norm() / truth.norm()).item()
    assert chunked_error <= naive_error, (chunked_error, naive_error)
    assert chunked_error < 1e-3, chunked_error  # float32 arithmetic; only the grads of bf16/fp16 inputs are rounded


def test_forward_under_autocast_is_float32_and_exact():
    hidden, weight, targets = _problem(0.13, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_target_logprobs(hidden, weight, targets, chunk_tokens=64, chunk_vocab=1000)
    assert got.dtype == torch.float32
    expected = _naive(hidden.detach().double(), weight.detach().double(), targets)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)
