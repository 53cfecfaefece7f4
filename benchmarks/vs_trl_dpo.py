"""A dftlite DFT2 step against a TRL `DPOTrainer` step (trl 1.16) on the same sequences, QLoRA.

Run from the repo root (2 shared CPU cores, 1 thread: ~4 min; all three sides ~6 min; the
full 30-layer model with --rounds 2 --steps 3 ~8 min):

    .venv/bin/python benchmarks/vs_trl_dpo.py --threads 1
    .venv/bin/python benchmarks/vs_trl_dpo.py --threads 1 --sides dft2,trl_dpo,dpo   # + dftlite's own DPO
    .venv/bin/python benchmarks/vs_trl_dpo.py --threads 1 --layers 0 --rounds 2 --steps 3

Prints one JSON line: per-side medians of step seconds, step peaks and process peak RSS, the
ratios to trl_dpo and the goals (dft2: time <= 0.8x, peak RSS <= 0.7x).

Held fixed on both sides: the base model, 4-bit NF4 with double quantization (dftlite's
`load_base_model`, compute dtype fp32 on CPU), LoRA r=16, alpha 32, dropout 0.05 on all linear
layers but the head, gradient checkpointing (non-reentrant), AdamW at lr 1e-4 with the cosine
schedule and 10% warmup, no mixed precision, max_length, and the token sequences: S prompts
(the first S GSM8K problems, the same every step), each with its data answer (DPO: chosen)
and one negative from a pool the benchmark model sampled (DPO: rejected). TRL gets dftlite's
token ids (its tokenization step is skipped, see `PretokenizedDPOTrainer`), so both sides
score exactly the same 2S sequences with gradients:

- dft2:    dftlite `method: dft2`, B = 1: 2S sequences, forward + backward, no reference.
- trl_dpo: TRL DPO (sigmoid, beta 0.1) with `ref_model=None` and a peft_config, so TRL wraps
           the 4-bit base with LoRA and takes the reference by disabling the adapters: the same
           2S sequences with gradients, plus their 2S reference forwards without gradients.
           As TRL does for quantized models, its LoRA weights are bf16 (dftlite's stay fp32).
- dpo:     (optional) dftlite's own `method: dpo` (= SPIN), also with a reference forward
           through the disabled adapters; it separates the objective from the implementation.

On CPU, TRL's fused LM head runs its PyTorch fallback, which scores every position of the
padded batch (prompt and padding too) in (positions, 32768) tiles and also returns entropy,
mean logit and top-1 flags; on CUDA/XPU with Triton it scores only the completion positions.
So CPU ratios do not carry over to a GPU; measure there with --layers 0.

Every side's model gets `common.keep_4bit_trainable`: without it, bitsandbytes 0.50 on an
AVX512-BF16 CPU repacks the 4-bit weights at dftlite's first eval-mode reference forward (dpo)
and from then on computes wrong gradients (faster, too). dft2 and TRL never run an eval-mode
forward while training, so it changes nothing for them; each child checks that no weight was
repacked.

Each side runs in its own subprocess, so the process's peak RSS (imports, loading,
quantization, training; `common.process_peak_rss_mib`) belongs to one trainer. Sides
alternate, the first side rotating each round. Within a subprocess the first --warmup_steps
steps are dropped from the step figures; the rest are timed from on_step_begin to on_step_end
(forward, backward, clip, optimizer, scheduler). Step peaks as in step_cost.py (CPU: VmHWM
reset at the step's start). `--malloc_mmap_threshold N` runs both sides with glibc's
MALLOC_MMAP_THRESHOLD_=N: a fixed threshold stops glibc from keeping freed large blocks on the
heap, which on CPU is most of a step's peak RSS.

The default model is SmolLM2-135M-Instruct cut to 4 decoder layers (real vocab 49152 and
tokenizer); see step_cost.py for why.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, StepMeter, commit, ensure_pool, gsm8k_data, machine, median, model_argument,  # noqa: E402
                    model_description, model_tag, on_cuda, keep_4bit_trainable, process_peak_rss_mib, repacked_4bit,
                    reset_peak, rounded, set_threads, step_shape)

SIDES = ("dft2", "trl_dpo", "dpo")
LORA = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05)  # dftlite's ModelConfig defaults, on both sides
SHARED = dict(learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0.1, seed=0, logging_steps=1,
              save_strategy="no", report_to="none", disable_tqdm=True, log_level="error", bf16=False,
              gradient_checkpointing=True)


def parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers kept (0 = the full 30-layer model)")
    parser.add_argument("--model", default=None, help="a local HF model directory instead of the embedded model")
    parser.add_argument("--precision", default="4bit", choices=("4bit", "fp32"))
    parser.add_argument("--num_prompts", type=int, default=2, help="S: prompts (DPO: pairs) per step")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--max_new_tokens", type=int, default=128, help="negatives' length cap in the pool")
    parser.add_argument("--sides", default="dft2,trl_dpo", help=f"comma-separated subset of {SIDES}")
    parser.add_argument("--rounds", type=int, default=3, help="subprocesses per side")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per subprocess")
    parser.add_argument("--warmup_steps", type=int, default=1, help="steps dropped per subprocess")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--malloc_mmap_threshold", type=int, default=0,
                        help="bytes; run the sides with MALLOC_MMAP_THRESHOLD_ set (0 = glibc's dynamic default)")
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "benchmarks"))
    parser.add_argument("--child", choices=SIDES, help="(internal) run one side, print its JSON")
    return parser.parse_args()


def paths(args):
    work = Path(args.work_dir)
    pool = work / f"pool-{model_tag(args)}-{args.precision}-S{args.num_prompts}-m1-t{args.max_new_tokens}"
    return work, pool, pool / "trl_sequences.json"


# ---- the parent: data, pool, the alternating subprocesses -----------------------------------


def prepare(args) -> dict:
    """Sample the pool (one negative per prompt) and write the token sequences TRL is given."""
    from dftlite.data import load_data
    from dftlite.draws import load_split
    from dftlite.models import ModelConfig, load_model

    work, pool, sequences = paths(args)
    model_config = ModelConfig(model_name_or_path=model_argument(args, work), precision=args.precision, lora_r=16)
    data_config = gsm8k_data(args.num_prompts, args.max_length)
    model, tokenizer = load_model(model_config)
    ensure_pool(model_config, data_config, pool, 1, args.max_new_tokens, model, tokenizer)
    split, _ = load_split(load_data(data_config), tokenizer, data_config, model, str(pool))
    shape = step_shape(split, 1)
    if shape["longest"] > args.max_length:  # TRL would cut it, dftlite does not cut negatives: not the same sequences
        raise SystemExit(f"a sequence has {shape['longest']} tokens > max_length {args.max_length}; lower --max_new_tokens")
    rows = [{"prompt_ids": pair.prompt_ids, "chosen_ids": pair.answer_ids, "rejected_ids": negatives[0]["token_ids"]}
            for pair, negatives in zip(split.pairs, split.negatives)]
    sequences.write_text(json.dumps(rows))
    return shape


def side_in_subprocess(args, side: str) -> dict:
    """One side in a fresh process (its peak RSS is its own); returns the child's JSON."""
    env = dict(os.environ)
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    command = [sys.executable, __file__, *sys.argv[1:], "--child", side]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"{side} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def side_in_process(args, side: str) -> dict:
    """One side in this process (gpu_check.py on CUDA, where the step peaks are the allocator's and
    need no fresh process; the process peak RSS then covers every side run so far)."""
    result = child(argparse.Namespace(**{**vars(args), "child": side}))
    gc.collect()
    if on_cuda():
        torch.cuda.empty_cache()  # the previous side's model is gone: hand its blocks back
    return result


def compare(args, run_side=side_in_subprocess) -> dict:
    sides = args.sides.split(",")
    set_threads(args.threads)  # as the children, so machine() reports it
    with contextlib.redirect_stdout(sys.stderr):
        shape = prepare(args)
    runs = {side: [] for side in sides}
    for number in range(args.rounds):
        for side in sides[number % len(sides):] + sides[:number % len(sides)]:  # rotate the first side
            with contextlib.redirect_stdout(sys.stderr):
                runs[side].append(run_side(args, side))
            if runs[side][-1]["repacked_4bit"]:
                raise SystemExit(f"{side}: 4-bit weights were repacked for inference, its gradients were wrong")

    def pooled(side, figure):  # every measured step of every subprocess
        return [step[figure] for run in runs[side] for step in run["steps"]]

    figures = ("seconds", "cpu_seconds", "peak_extra_mib", "peak_mib")
    result = {side: {f"median_{figure}": median(pooled(side, figure)) for figure in figures} for side in sides}
    for side in sides:
        result[side]["median_process_peak_mib"] = median([run["process_peak_mib"] for run in runs[side]])
        result[side]["median_rss_before_train_mib"] = median([run["rss_before_train_mib"] for run in runs[side]])
        result[side]["median_train_peak_mib"] = median([run["train_peak_mib"] for run in runs[side]])
        result[side]["steps_seconds"] = pooled(side, "seconds")
        result[side]["process_peak_mib"] = [run["process_peak_mib"] for run in runs[side]]
        result[side]["warmup_peak_mib"] = [step["peak_mib"] for run in runs[side] for step in run["warmup_steps"]]

    def ratio(side, figure):
        return result[side][figure] / result["trl_dpo"][figure]

    ratios = {}
    for side in (s for s in sides if s != "trl_dpo"):
        for figure in ("median_seconds", "median_cpu_seconds", "median_process_peak_mib", "median_train_peak_mib",
                       "median_peak_mib", "median_peak_extra_mib"):
            ratios[f"{side}_over_trl_dpo_{figure.removeprefix('median_')}"] = ratio(side, figure)
    goals = {}
    if "dft2" in sides:
        goals = {
            "dft2_over_trl_dpo_seconds <= 0.8": ratios["dft2_over_trl_dpo_seconds"] <= 0.8,
            "dft2_over_trl_dpo_cpu_seconds <= 0.8": ratios["dft2_over_trl_dpo_cpu_seconds"] <= 0.8,
            "dft2_over_trl_dpo_process_peak_mib <= 0.7": ratios["dft2_over_trl_dpo_process_peak_mib"] <= 0.7,
            "dft2_over_trl_dpo_train_peak_mib <= 0.7": ratios["dft2_over_trl_dpo_train_peak_mib"] <= 0.7,
        }
    return {
        "benchmark": "vs_trl_dpo",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit(),
        "machine": machine(),
        "trl": version("trl"),
        "device": "cuda" if on_cuda() else "cpu",
        "model": model_description(args),
        "precision": args.precision,
        "S": args.num_prompts,
        "step": shape,
        "rounds": args.rounds, "steps_per_round": args.steps, "warmup_steps": args.warmup_steps,
        "malloc_mmap_threshold": args.malloc_mmap_threshold or "glibc default (dynamic)",
        "sides": result,
        "ratios": ratios,
        "goals": goals,
    }


# ---- a child: one side, one process ---------------------------------------------------------


def dftlite_trainer(args, side, meter):
    from dftlite.models import ModelConfig, load_model
    from dftlite.trainer import DFTConfig, build_trainer

    work, pool, _ = paths(args)
    model_config = ModelConfig(model_name_or_path=model_argument(args, work), precision=args.precision, **LORA)
    model, tokenizer = load_model(model_config, gradient_checkpointing=True)
    keep_4bit_trainable(model)  # dpo: its reference forward runs in eval mode without grad
    config = DFTConfig(output_dir=str(work / f"vs_trl-{side}"), method=side, pool_dir=str(pool), num_negatives_per_step=1,
                       per_device_train_batch_size=args.num_prompts, max_steps=args.warmup_steps + args.steps,
                       allow_negative_reuse=True, use_cpu=not on_cuda(), **SHARED)
    return build_trainer(model_config, gsm8k_data(args.num_prompts, args.max_length), config, model, tokenizer,
                         callbacks=[meter])


def trl_trainer(args, meter):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from dftlite.models import ModelConfig, load_base_model

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on rows that already hold prompt_ids / chosen_ids / rejected_ids (dftlite's tokens)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    work, _, sequences = paths(args)
    model, tokenizer = load_base_model(ModelConfig(model_name_or_path=model_argument(args, work),
                                                   precision=args.precision))
    keep_4bit_trainable(model)  # as on the dftlite sides (TRL's reference forward stays in train mode anyway)
    config = DPOConfig(output_dir=str(work / "vs_trl-trl_dpo"), per_device_train_batch_size=args.num_prompts,
                       max_steps=args.warmup_steps + args.steps, max_length=args.max_length, beta=0.1,
                       gradient_checkpointing_kwargs={"use_reentrant": False}, disable_dropout=False,
                       use_cpu=not on_cuda(), **SHARED)
    peft_config = LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    dataset = Dataset.from_list(json.loads(sequences.read_text()))
    return PretokenizedDPOTrainer(model=model, ref_model=None, args=config, train_dataset=dataset,
                                  processing_class=tokenizer, peft_config=peft_config, callbacks=[meter])


def child(args) -> dict:
    set_threads(args.threads)
    meter = StepMeter()
    trainer = trl_trainer(args, meter) if args.child == "trl_dpo" else dftlite_trainer(args, args.child, meter)
    before = reset_peak()
    trainer.train()
    return {
        "side": args.child,
        "warmup_steps": meter.steps[:args.warmup_steps],
        "steps": meter.steps[args.warmup_steps:],
        "rss_before_train_mib": before / 2**20,
        "train_peak_mib": max(step["peak_mib"] for step in meter.steps),  # warm-up steps included
        "process_peak_mib": process_peak_rss_mib(),
        "repacked_4bit": repacked_4bit(trainer.model),  # must stay false: see common.keep_4bit_trainable
    }


def main():
    args = parse()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON line
        result = child(args) if args.child else None
    if result is None:
        result = compare(args)
    print(json.dumps(rounded(result)), flush=True)


if __name__ == "__main__":
    main()
