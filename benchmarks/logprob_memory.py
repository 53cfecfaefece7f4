"""Peak memory of forward + backward of sequence log-probs: chunked vs naive full logits.

Run from the repo root (on 2 busy CPU cores: ~8 min for the first line, ~45 min for the second):

    .venv/bin/python benchmarks/logprob_memory.py --cases head,head-trainable --reps 5
    .venv/bin/python benchmarks/logprob_memory.py --cases model --reps 3

Prints one JSON line per comparison: median peaks (MiB) of each side, the ratio
chunked / naive, the reps, the machine and the torch version.

What is compared, with N=12 sequences of T=512 tokens, the last 256 tokens of each the
completion (so M = 12*256 = 3072 scored positions), SmolLM2-135M's head (V=49152, H=576):

- head: ``sequence_logprobs`` vs ``naive_sequence_logprobs`` on a stub model whose trunk
  returns a leaf hidden-state tensor (N, T, H) that requires grad, so only the log-prob
  head is measured: chunked tiles at completion positions vs (N, T, V) logits + log_softmax
  over all positions. The lm_head weight (V, H) is frozen, as under LoRA (SmolLM2 ties it to
  the embeddings and ``all-linear`` LoRA leaves it out).
- head-trainable: the same with a trainable lm_head weight (adds its (V, H) gradient to both).
- model: the embedded SmolLM2-135M in fp32 with LoRA r=8, train mode, gradient
  checkpointing on (non-reentrant); the whole forward + backward.

How: each measurement runs in a fresh subprocess (``--side chunked|naive``), sides
alternate. On CPU the peak is the kernel's peak resident set (VmHWM, reset through
/proc/self/clear_refs right before the measured forward + backward) minus the resident
set at that moment, after setup and a warm-up on a tiny batch; children run with
MALLOC_MMAP_THRESHOLD_=65536 so that freed memory leaves the resident set (with glibc's
defaults and no warm-up, a first whole-model run read 5.9 GiB chunked vs 8.9 GiB naive,
mostly freed heap that glibc kept). tracemalloc would not see PyTorch's CPU allocations.
On CUDA it is torch.cuda.max_memory_allocated minus memory_allocated before.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MIB, machine, peak, reset_peak  # noqa: E402

NUM_SEQUENCES, SEQ_LEN, COMPLETION_LEN = 12, 512, 256
VOCAB, HIDDEN = 49152, 576  # SmolLM2-135M
CASES = ("head", "head-trainable", "model")
# glibc keeps freed blocks up to 32 MiB in its heap and reuses them unseen by RSS; a fixed
# threshold puts every block >= 64 KiB in its own mapping, so RSS tracks live memory
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


class IdentityTrunkLM(torch.nn.Module):
    """A causal-LM stand-in whose trunk returns a fixed hidden tensor: isolates the head."""

    base_model_prefix = "model"

    def __init__(self, hidden, trainable_head):
        super().__init__()
        self.config = SimpleNamespace()  # no logit soft-capping or scaling
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, device=hidden.device)
        torch.nn.init.normal_(self.lm_head.weight, std=0.02)
        self.lm_head.weight.requires_grad_(trainable_head)
        self.hidden = hidden

    def model(self, input_ids, **kwargs):
        # (n, t, H): a view of the leaf, so a small warm-up batch works too
        return SimpleNamespace(last_hidden_state=self.hidden[: input_ids.shape[0], : input_ids.shape[1]])

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask, use_cache=False):
        return SimpleNamespace(logits=self.lm_head(self.model(input_ids).last_hidden_state))  # (N, T, V)


def batch(device, vocab):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (NUM_SEQUENCES, SEQ_LEN), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, -COMPLETION_LEN:] = 1
    return input_ids, attention_mask, completion_mask


def build(case, device):
    torch.manual_seed(0)
    if case == "model":
        from dftlite.models import ModelConfig, load_model

        # checkpointing, as a memory-conscious LoRA run uses: without it the trunk's activations
        # dominate both sides, and N=12 did not fit the 23 GiB machine this was written on
        model, _ = load_model(ModelConfig(precision="fp32", lora_r=8), gradient_checkpointing=True)
        model.train()
        return model, batch(device, model.get_base_model().config.vocab_size)
    hidden = (torch.randn(NUM_SEQUENCES, SEQ_LEN, HIDDEN, device=device)).requires_grad_()  # (N, T, H) leaf
    return IdentityTrunkLM(hidden, trainable_head=case == "head-trainable"), batch(device, VOCAB)


def measure_one(case, side):
    """Run one forward + backward in this process; return peak extra memory and a checksum."""
    from dftlite.logprobs import naive_sequence_logprobs, sequence_logprobs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, (input_ids, attention_mask, completion_mask) = build(case, device)
    score = sequence_logprobs if side == "chunked" else naive_sequence_logprobs
    # warm-up on a tiny batch: one-time library set-up (thread pools, kernels) is not measured
    warm_completion = torch.zeros_like(completion_mask[:1, :64])
    warm_completion[:, 32:] = 1
    score(model, input_ids[:1, :64], attention_mask[:1, :64], warm_completion)[0].sum().backward()
    model.zero_grad(set_to_none=True)
    if case != "model":
        model.hidden.grad = None
    baseline = reset_peak()  # CPU: freed setup memory goes back to the kernel first, so it is not reused unseen
    start = time.perf_counter()
    logp_sums, _ = score(model, input_ids, attention_mask, completion_mask)  # (N,)
    logp_sums.sum().backward()
    top = peak()
    seconds = time.perf_counter() - start
    return {"peak_mib": (top - baseline) / MIB, "seconds": seconds, "checksum": logp_sums.sum().item()}


def compare(case, reps):
    """Alternate fresh subprocesses for the two sides; return the summary dict."""
    runs = {"chunked": [], "naive": []}
    for _ in range(reps):
        for side in ("chunked", "naive"):
            command = [sys.executable, __file__, "--case", case, "--side", side]
            result = subprocess.run(command, capture_output=True, text=True, check=True, env=CHILD_ENV)
            runs[side].append(json.loads(result.stdout.strip().splitlines()[-1]))
    median = {side: statistics.median(run["peak_mib"] for run in runs[side]) for side in runs}
    return {
        "case": case,
        "N": NUM_SEQUENCES,
        "T": SEQ_LEN,
        "completion_tokens_per_seq": COMPLETION_LEN,
        "V": VOCAB,
        "H": HIDDEN,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "metric": "max_memory_allocated delta" if torch.cuda.is_available() else "peak RSS delta (VmHWM)",
        "chunked_peak_mib": round(median["chunked"], 1),
        "naive_peak_mib": round(median["naive"], 1),
        "ratio": round(median["chunked"] / median["naive"], 4),
        "reps": reps,
        "chunked_peaks_mib": [round(run["peak_mib"], 1) for run in runs["chunked"]],
        "naive_peaks_mib": [round(run["peak_mib"], 1) for run in runs["naive"]],
        "chunked_seconds": round(statistics.median(run["seconds"] for run in runs["chunked"]), 2),
        "naive_seconds": round(statistics.median(run["seconds"] for run in runs["naive"]), 2),
        "max_checksum_diff": max(
            abs(a["checksum"] - b["checksum"]) for a, b in zip(runs["chunked"], runs["naive"])
        ),
        **machine(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    parser.add_argument("--reps", type=int, default=5, help="fresh subprocesses per side and case")
    parser.add_argument("--case", choices=CASES, help="(internal) the case of a single measurement")
    parser.add_argument("--side", choices=("chunked", "naive"), help="(internal) measure one side, print JSON")
    args = parser.parse_args()
    if args.side:
        print(json.dumps(measure_one(args.case, args.side)))
        return
    for case in args.cases.split(","):
        if case not in CASES:
            parser.error(f"unknown case {case!r}; choose from {CASES}")
        print(json.dumps(compare(case, args.reps)), flush=True)


if __name__ == "__main__":
    main()
