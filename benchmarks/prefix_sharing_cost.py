"""Cost of a DFT2 step with each prompt computed once for its 1+B answers (share_prompt) against the unshared step.

Run from the repo root (2 shared CPU cores, 1 thread: ~10 min with the default 4-layer model):

    .venv/bin/python benchmarks/prefix_sharing_cost.py --threads 1
    .venv/bin/python benchmarks/prefix_sharing_cost.py --threads 1 --layers 0 --shapes gsm8k --rounds 4   # 30 layers

Prints one JSON line: per shape and side the medians of step seconds, peak memory and tokens computed,
the paired ratios shared / unshared and the goals (GSM8K groups <= 0.80 of the time, peak memory no
higher; long prompts <= 0.65).

Shapes (S prompts, B negatives each, the CPU recipe configs/smollm2-135m_gsm8k_dft2_cpu.yaml: S 4, B 2,
token_budget 4096, gradient checkpointing, LoRA r16, fp32):
- gsm8k: S GSM8K problems of the recipe's 64 (`--first`) in the chat template with their gold answers;
  negatives: other recipe problems' gold answers of 110 tokens or more cut to 128 (the recipe's negatives
  are sampled up to 128 tokens). Lengths, not content, set the cost; the defaults give prompt, gold and
  negative means near the recipe pool's (95, 130, 119 tokens).
- long_prompt: the same answers under a few-shot prompt (the `--shots` problems before it, with their gold
  answers, as earlier chat turns): the prompt is at least as long as the answers.

A step is what `DFTTrainer._forward` runs for DFT2 (micro-batches of whole groups under token_budget; per
micro-batch: score, `losses.method_loss`, backward) followed by AdamW's step, timed from the first
micro-batch to the optimizer step; the Trainer's bookkeeping around it is left out. Both sides run on one
model in one process, alternating shared / unshared and the shapes in rotating order per round, so slow
phases of the shared machine hit both sides alike; ratios are medians over rounds of the within-round
ratio; the first `--warmup_rounds` rounds are dropped.

Memory: as step_cost.py, the peak during the step (CPU: VmHWM after malloc_trim; CUDA:
max_memory_allocated) minus the memory at its start ("extra"), and the peak itself.
Tokens computed: the (rows × width) tokens the trunk runs, padding included, and the real tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MIB, add_round_arguments, benchmark_model, commit, gsm8k_data, machine, median, on_cuda,  # noqa: E402
                    peak, print_result, reset_peak, set_threads)

from dftlite.data import encode_examples, load_data  # noqa: E402
from dftlite.draws import Group, micro_batches, pad_groups  # noqa: E402
from dftlite.logprobs import sequence_logprobs  # noqa: E402
from dftlite.losses import method_loss  # noqa: E402
from dftlite.models import ModelConfig, load_model  # noqa: E402
from dftlite.prefix_sharing import pack_groups, shared_prompt_logprobs  # noqa: E402

SIDES = ("shared", "unshared")
GOALS = {"gsm8k": 0.80, "long_prompt": 0.65}  # time of a shared step / an unshared one


def build_groups(tokenizer, first: int, num_prompts: int, negatives: int, shots: int, max_length: int) -> list[Group]:
    """S groups: GSM8K problems first..first+S-1 of the CPU recipe's 64; shots > 0: the `shots` problems before
    each as earlier chat turns (the long-prompt shape). Negatives: other recipe problems' gold answers of 110
    tokens or more, cut to 128 (the recipe's negatives are sampled up to 128 tokens), taken in turn."""
    if first < shots:
        raise ValueError(f"--first {first} leaves fewer than --shots {shots} problems before the first prompt")
    examples = load_data(gsm8k_data(64, 100_000))
    answers = [p.answer_ids for p in encode_examples(tokenizer, examples, "chat", 100_000)[0].values()]
    long_answers = [answer[:128] for answer in answers if len(answer) >= 110]
    chosen = examples[first:first + num_prompts]
    if shots:
        chosen = [dataclasses.replace(example, prompt=[turn for earlier in examples[first + i - shots:first + i] for turn in
                                                       earlier.prompt + [{"role": "assistant", "content": earlier.answer}]]
                                      + example.prompt) for i, example in enumerate(chosen)]
    encoded, _ = encode_examples(tokenizer, chosen, "chat", max_length)
    groups = []
    for i, example in enumerate(chosen):
        pair = encoded[example.id]
        others = [long_answers[(i * negatives + k) % len(long_answers)] for k in range(negatives)]
        groups.append(Group(example.id, pair.prompt_ids, [pair.answer_ids] + others, []))
    return groups


def step(model, optimizer, groups: list[Group], shared: bool, token_budget: int, pad_id: int, device) -> dict:
    """One DFT2 step as the trainer runs it; returns its figures."""
    rows, num_prompts = len(groups[0].completions), len(groups)
    positive_tokens = sum(len(g.completions[0]) for g in groups)
    padded = real = 0
    start_memory = reset_peak()
    start = time.perf_counter()
    for members in micro_batches(groups, token_budget, packed=shared):
        mb_groups = [groups[g] for g in members]
        if shared:
            packed = pack_groups(mb_groups, pad_id, device)
            logps, lengths = shared_prompt_logprobs(model, *packed.tensors())
            padded += packed.input_ids.numel()
            real += sum(g.packed_length for g in mb_groups)
        else:
            inputs = pad_groups(mb_groups, pad_id, device)
            logps, lengths = sequence_logprobs(model, *inputs)
            padded += inputs[0].numel()
            real += int(inputs[1].sum())
        logps, lengths = logps.view(-1, rows), lengths.view(-1, rows).to(logps.dtype)  # (S_mb, 1+B)
        loss, _, _ = method_loss(
            "dft2", logps[:, 0], lengths[:, 0], logps[:, 1:], lengths[:, 1:], tau=0.3, beta=10.0,
            simpo_gamma_beta_ratio=0.5, sft_weight=2.5, log_u_prev=torch.zeros(len(members), dtype=torch.float64),
            gamma=torch.full((len(members),), 0.9, dtype=torch.float64), group_share=len(members) / num_prompts,
            token_share=sum(len(g.completions[0]) for g in mb_groups) / positive_tokens)
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if on_cuda():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    top = peak()
    return {"seconds": seconds, "peak_mib": top / MIB, "peak_extra_mib": (top - start_memory) / MIB,
            "tokens_padded": padded, "tokens_real": real}


def _mean(values) -> float:
    return sum(values) / max(len(values), 1)


def shape_figures(groups: list[Group]) -> dict:
    prompt = [len(g.prompt_ids) for g in groups]
    unshared = sum(len(g.prompt_ids) + len(c) for g in groups for c in g.completions)
    return {"prompt_mean": _mean(prompt),
            "gold_mean": _mean([len(g.completions[0]) for g in groups]),
            "negative_mean": _mean([len(c) for g in groups for c in g.completions[1:]]),
            "prompt_share_of_unshared_tokens": sum(len(g.prompt_ids) * len(g.completions) for g in groups) / unshared}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers kept (0 = the full 30-layer model)")
    parser.add_argument("--first", type=int, default=15, help="the first problem (0-based) of the recipe's 64: "
                        "problems 15-18 average prompt 97.5 and gold 132.8 tokens, near the recipe's figures")
    parser.add_argument("--num_prompts", type=int, default=4, help="S, prompts per step (the CPU recipe: 4)")
    parser.add_argument("--negatives", type=int, default=2, help="B, negatives per prompt (the CPU recipe: 2)")
    parser.add_argument("--shots", type=int, default=4, help="earlier problems in the long prompt")
    parser.add_argument("--token_budget", type=int, default=4096, help="as the CPU recipe")
    parser.add_argument("--max_length", type=int, default=384, help="as the CPU recipe; the long prompt: 4096")
    parser.add_argument("--shapes", default="gsm8k,long_prompt", help="comma-separated subset of gsm8k,long_prompt")
    add_round_arguments(parser, rounds=5)
    print_result(run, parser.parse_args())


def run(args) -> dict:
    set_threads(args.threads)
    work = Path(args.work_dir)
    model_config = ModelConfig(model_name_or_path=benchmark_model(args.layers, work), precision="fp32", lora_r=16,
                               lora_alpha=32)
    model, tokenizer = load_model(model_config, gradient_checkpointing=True)
    model.train()
    for module in model.modules():  # scoring_dropout: false, as the trainer
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shapes = {"gsm8k": build_groups(tokenizer, args.first, args.num_prompts, args.negatives, 0, args.max_length),
              "long_prompt": build_groups(tokenizer, args.first, args.num_prompts, args.negatives, args.shots, 4096)}
    shapes = {name: groups for name, groups in shapes.items() if name in args.shapes.split(",")}
    runs = [(shape, side) for shape in shapes for side in SIDES]
    values = {shape: {side: [] for side in SIDES} for shape in shapes}
    for number in range(args.warmup_rounds + args.rounds):
        for shape, side in runs[number % len(runs):] + runs[:number % len(runs)]:  # rotating order
            figures = step(model, optimizer, shapes[shape], side == "shared", args.token_budget, pad_id, device)
            print(f"round {number} {shape} {side}: {figures}", file=sys.stderr, flush=True)
            if number >= args.warmup_rounds:
                values[shape][side].append(figures)

    result = {"benchmark": "prefix_sharing_cost", "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "commit": commit(), "machine": machine(), "device": "cuda" if on_cuda() else "cpu",
              "model": f"SmolLM2-135M-Instruct, first {args.layers} layers" if args.layers else "SmolLM2-135M-Instruct",
              "S": args.num_prompts, "B": args.negatives, "token_budget": args.token_budget,
              "rounds": args.rounds, "warmup_rounds": args.warmup_rounds, "shapes": {}}
    for shape, groups in shapes.items():
        sides = values[shape]
        figures = ("seconds", "peak_mib", "peak_extra_mib", "tokens_padded", "tokens_real")
        ratios = {figure: median([a[figure] / b[figure] for a, b in zip(sides["shared"], sides["unshared"])])
                  for figure in figures}
        result["shapes"][shape] = {
            **shape_figures(groups),
            "median": {side: {f: median([r[f] for r in sides[side]]) for f in figures} for side in SIDES},
            "shared_over_unshared": ratios,
            "goals": {f"seconds <= {GOALS[shape]}": ratios["seconds"] <= GOALS[shape],
                      "peak_extra_mib <= 1": ratios["peak_extra_mib"] <= 1.0},
            "seconds_per_round": {side: [r["seconds"] for r in sides[side]] for side in SIDES},
        }
    return result


if __name__ == "__main__":
    main()
