"""Cost of a DFT2 training step against an SFT step on the same sequences, and DFT against DFT2.

Run from the repo root (2 shared CPU cores, 1 thread: ~4-5 min, fp32 or 4bit):

    .venv/bin/python benchmarks/step_cost.py --threads 1
    .venv/bin/python benchmarks/step_cost.py --threads 1 --precision 4bit
    .venv/bin/python benchmarks/step_cost.py --layers 0 --rounds 10      # the full 30-layer model (GPU)

Prints one JSON line: per-side medians of step seconds and peak memory, the paired ratios
and the goals (DFT2 / SFT time <= 1.10; DFT / DFT2 time <= 1.05).

What a step is: one `DFTTrainer` optimizer step through transformers' Trainer loop (forward,
backward, gradient clipping, AdamW, scheduler), timed from on_step_begin to on_step_end, on
S prompts (the first S GSM8K problems, the same every step) with B negatives each from a pool
the benchmark model sampled itself (m = B, so every step draws the same negatives): the same
(1+B)·S sequences, padded to one (N, T) micro-batch, on every side. The sides differ only in
the objective:

- sft:  token-level NLL over all (1+B)·S sequences, the negatives treated as positives
        (`losses.sft_loss` on the flattened scores; no u table). dftlite's own `method: sft`
        trains on the S positives only, so it would process fewer sequences than DFT2.
- dft2: `method: dft2` (mean token log-prob scores, u table update).
- dft:  `method: dft` with the pool's cached log P_g0 (reference: sampler_prompt, logp_sampler).

All sides live in one trainer on one model, switching objective between steps (each with its
own u table), in rotating order per round (sft dft2 dft, dft2 dft sft, ...); the first
`--warmup_rounds` rounds are dropped. Ratios are medians over rounds of the within-round
ratio, so slow phases of the shared machine hit both sides of a ratio alike.

Memory: peak during the step (CPU: VmHWM reset at the step's start after malloc_trim; CUDA:
max_memory_allocated), reported as the peak and as the peak minus the memory at the step's
start ("extra"). The sides share one process, so the extra is the comparable figure.

The default model is the embedded SmolLM2-135M-Instruct cut to its first 4 decoder layers
(real embeddings, vocab 49152, tokenizer): the full 30 layers take ~70-120 s per step here.
A smaller trunk makes the objective's fixed costs a larger share of the step, so the ratios
are if anything pessimistic for DFT2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (StepMeter, add_round_arguments, commit, ensure_pool, gsm8k_data, keep_4bit_trainable,  # noqa: E402
                    machine, median, model_argument, model_description, model_tag, on_cuda, print_result,
                    repacked_4bit, set_threads, step_shape)

from dftlite.data import load_data  # noqa: E402
from dftlite.draws import load_split  # noqa: E402
from dftlite.dft_config import METHOD_SETTINGS  # noqa: E402
from dftlite.estimators import LogUTable  # noqa: E402
from dftlite.losses import sft_loss  # noqa: E402
from dftlite.models import ModelConfig, load_model  # noqa: E402
from dftlite.trainer import DFTConfig, DFTTrainer  # noqa: E402

SIDES = ("sft", "dft2", "dft")
WITH_U = ("dft2", "dft")  # the sides with a u table, each with its method's own tau and gamma


class AlternatingTrainer(DFTTrainer):
    """A DFTTrainer whose objective can be switched between steps: sft (all rows), dft2, dft."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.side = "dft2"
        self.tables = {side: LogUTable(len(self.train_split), init=self.args.u_init) for side in WITH_U}

    def use(self, side: str):
        self.side = side
        self.uses_u = side != "sft"
        if side in WITH_U:
            self.args.method = side  # read per step by _groups (DFT's cached log P_g0) and micro_batch_loss
            self.args.tau, self.args.gamma = METHOD_SETTINGS[side]["tau"], METHOD_SETTINGS[side]["gamma"]
            self.log_u = self.tables[side]

    def micro_batch_loss(self, logps, lengths, **inputs):
        if self.side != "sft":
            return super().micro_batch_loss(logps, lengths, **inputs)
        loss, metrics = sft_loss(logps.flatten(), lengths.flatten())  # (S_mb, 1+B): all rows as positives
        return loss * inputs["group_share"], None, metrics


def schedule(sides, rounds: int) -> list[str]:
    """Round r runs the sides rotated by r: every side takes every position equally often."""
    return [sides[(r + i) % len(sides)] for r in range(rounds) for i in range(len(sides))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers kept (0 = the full 30-layer model)")
    parser.add_argument("--model", default=None, help="a local HF model directory instead of the embedded model")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "4bit"))
    parser.add_argument("--num_prompts", type=int, default=2, help="S, prompts per step")
    parser.add_argument("--negatives", type=int, default=2, help="B, negatives per prompt per step")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--max_new_tokens", type=int, default=128, help="negatives' length cap in the pool")
    add_round_arguments(parser, rounds=10)
    print_result(run, parser.parse_args())


def run(args) -> dict:
    """The whole measurement; `args` as main's parser makes them (gpu_check.py passes a Namespace)."""
    set_threads(args.threads)
    work = Path(args.work_dir)

    model_config = ModelConfig(model_name_or_path=model_argument(args, work), precision=args.precision, lora_r=16)
    data_config = gsm8k_data(args.num_prompts, args.max_length)
    model, tokenizer = load_model(model_config, gradient_checkpointing=True)
    keep_4bit_trainable(model)  # 4bit: the pool is sampled (eval, no grad) with the model that then trains
    pool_dir = work / f"pool-{model_tag(args)}-{args.precision}-S{args.num_prompts}-m{args.negatives}-t{args.max_new_tokens}"
    ensure_pool(model_config, data_config, pool_dir, args.negatives, args.max_new_tokens, model, tokenizer)
    split, _ = load_split(load_data(data_config), tokenizer, data_config, model, str(pool_dir))

    steps = schedule(SIDES, args.warmup_rounds + args.rounds)
    config = DFTConfig(output_dir=str(work / "step_cost-out"), method="dft2", pool_dir=str(pool_dir),
                       num_negatives_per_step=args.negatives, per_device_train_batch_size=args.num_prompts,
                       max_steps=len(steps), allow_negative_reuse=True, save_strategy="no", logging_steps=1,
                       disable_tqdm=True, log_level="error", seed=0, use_cpu=not on_cuda())
    trainer = None
    meter = StepMeter(before_step=lambda step: trainer.use(steps[step]))
    trainer = AlternatingTrainer(model, config, tokenizer, split, callbacks=[meter])
    trainer.train()
    assert not repacked_4bit(model), "4-bit weights were repacked for inference: the gradients were wrong"

    # per side and figure: the measured steps' values, in round order
    figures = ("seconds", "cpu_seconds", "peak_extra_mib", "peak_mib")
    values = {figure: {side: [] for side in SIDES} for figure in figures}
    for side, record in list(zip(steps, meter.steps))[args.warmup_rounds * len(SIDES):]:
        for figure in figures:
            values[figure][side].append(record[figure])

    def paired(figure, a, b):  # median over rounds of a's value / b's value in the same round
        return median([x / y for x, y in zip(values[figure][a], values[figure][b])])

    ratios = {f"{a}_over_{b}_{figure}": paired(figure, a, b) for a, b in (("dft2", "sft"), ("dft", "dft2"))
              for figure in figures}
    return {
        "benchmark": "step_cost",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit(),
        "machine": machine(),
        "device": "cuda" if on_cuda() else "cpu",
        "model": model_description(args),
        "precision": args.precision,
        "gradient_checkpointing": True,
        "S": args.num_prompts, "B": args.negatives,
        "step": step_shape(split, args.negatives),
        "rounds": args.rounds, "warmup_rounds": args.warmup_rounds,
        "median": {figure: {side: median(values[figure][side]) for side in SIDES} for figure in figures},
        "ratios": ratios,
        "goals": {
            "dft2_over_sft_seconds <= 1.10": ratios["dft2_over_sft_seconds"] <= 1.10,
            "dft2_over_sft_cpu_seconds <= 1.10": ratios["dft2_over_sft_cpu_seconds"] <= 1.10,
            "dft_over_dft2_seconds <= 1.05": ratios["dft_over_dft2_seconds"] <= 1.05,
            "dft_over_dft2_cpu_seconds <= 1.05": ratios["dft_over_dft2_cpu_seconds"] <= 1.05,
        },
        "per_step": values,
    }

if __name__ == "__main__":
    main()
