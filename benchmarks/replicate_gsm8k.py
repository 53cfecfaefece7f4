"""Mini-replication of the DFT paper's central claim on GSM8K (a benchmark, not a test).

    .venv/bin/python benchmarks/replicate_gsm8k.py            # the scale of docs/results.md (~2 h on 2 CPU cores)
    .venv/bin/python benchmarks/replicate_gsm8k.py --methods dft2_u_one,dft_u_one,dft_train_prompt   # variants

docs/results.md ran one process per method (`--methods sft`, then `--methods dft2`, ...): a long
single process evaluated noticeably slower there.

SmolLM2-135M-Instruct with QLoRA; GSM8K train prompts (bundled copy of ../shared/data/gsm8k);
E = 2 epochs × B = 2 negatives per step = 4 pool negatives per prompt; every method gets the
same steps, learning-rate schedule and LoRA initialisation. Evaluation on the first `num_dev`
problems of the bundled dev set: greedy accuracy, and the discrimination win rate against dev
negatives sampled once from the base model and cached.

Everything lives under --run_dir (default runs/replicate, ignored by git):
  data/ pool-train/ pool-dev/         shared inputs (sampling resumes where it stopped)
  <method>/adapter                     each method's adapter: `dftlite eval --adapter_path` re-evaluates it
  <method>/result.json                 written last: a method with one is skipped on rerun (resume per method)
  results.json, curves.png             the table and the training curves of all methods
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import commit

REPO = Path(__file__).resolve().parent.parent
GSM8K = REPO / "dftlite" / "resources" / "gsm8k"

# name -> DFTConfig overrides. "base" is the untrained model (sampler view). The main rows use the
# library defaults (u_init first_batch, reference sampler_prompt, the method's own tau and gamma);
# the variants change one setting each.
METHODS = {
    "sft": {"method": "sft"},
    "dft2": {"method": "dft2"},
    "dft": {"method": "dft"},
    "simpo_sft": {"method": "simpo_sft"},
    "dft2_u_one": {"method": "dft2", "u_init": "one"},
    "dft_u_one": {"method": "dft", "u_init": "one"},
    "dft_train_prompt": {"method": "dft", "reference": "train_prompt"},
    # DFT2 sensitivity (docs/results.md): one setting each; lora_r also sets lora_alpha = 2 r
    "dft2_tau1": {"method": "dft2", "tau": 1.0},
    "dft2_lr1e-4": {"method": "dft2", "learning_rate": 1e-4},
    "dft2_lr5e-4": {"method": "dft2", "learning_rate": 5e-4},
    "dft2_r64": {"method": "dft2", "lora_r": 64},
}


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default="runs/replicate")
    parser.add_argument("--num_train", type=int, default=128)
    parser.add_argument("--shortest_of", type=int, default=0,
                        help="take the num_train shortest of the first N train problems (0 = the first num_train)")
    parser.add_argument("--num_dev", type=int, default=150)
    parser.add_argument("--methods", default="sft,dft2,dft,simpo_sft")
    parser.add_argument("--precision", default="4bit")
    parser.add_argument("--max_new_tokens", type=int, default=160, help="greedy answers")
    parser.add_argument("--neg_max_new_tokens", type=int, default=128, help="pool negatives (paper: 256)")
    parser.add_argument("--max_length", type=int, default=384)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=4, help="S prompts per step")
    parser.add_argument("--eval_batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def write_subset(source: Path, target: Path, count: int, shortest_of: int = 0, start: int = 0) -> Path:
    """The problems start .. start + count - 1 of `source` (0-based), or the `count` shortest of its first
    `shortest_of`."""
    rows = [json.loads(line) for line in open(source)][start:]
    if shortest_of:
        rows = sorted(rows[:shortest_of], key=lambda r: len(r["question"]) + len(r["answer"]))
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w") as handle:
        for row in rows[:count]:
            handle.write(json.dumps(row) + "\n")
    return target


def summary(result: dict) -> dict:
    keys = ["accuracy", "correct", "total", "win_rate", "gold_logp_per_token", "negative_logp_per_token", "mean_margin"]
    return {k: result[k] for k in keys if k in result}


def main():
    args = parse()
    import torch

    from dftlite.data import DataConfig
    from dftlite.evaluate import EvalConfig, evaluate
    from dftlite.models import ModelConfig, load_model
    from dftlite.sampling import SampleConfig, sample_pool
    from dftlite.trainer import DFTConfig, train

    run_dir = Path(args.run_dir)
    started = time.time()
    code_commit = commit()  # at the start: the code this run used
    train_path = write_subset(GSM8K / "train.jsonl", run_dir / "data" / "train.jsonl", args.num_train, args.shortest_of)
    dev_path = write_subset(GSM8K / "dev.jsonl", run_dir / "data" / "dev.jsonl", args.num_dev)
    model_config = ModelConfig(precision=args.precision, lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
    train_data = DataConfig(data_path=str(train_path), max_length=args.max_length)
    dev_data = DataConfig(data_path=str(dev_path), max_length=args.max_length)
    on_gpu = torch.cuda.is_available()
    timings = json.loads((run_dir / "timings.json").read_text()) if (run_dir / "timings.json").exists() else {}

    # Shared inputs. Pools resume, so a rerun after a crash only samples what is missing.
    model, tokenizer = load_model(model_config)
    common = dict(max_new_tokens=args.neg_max_new_tokens, seed=args.seed, score_train_prompt=True)
    for split, data, count in [("train", train_data, 4), ("dev", dev_data, 2)]:
        stats = sample_pool(model_config, data, SampleConfig(pool_dir=str(run_dir / f"pool-{split}"), num_negatives=count,
                                                            **common), model=model, tokenizer=tokenizer)
        # seconds spent sampling, summed over invocations (a resumed pool only adds what was missing)
        timings[f"sampling_{split}_s"] = timings.get(f"sampling_{split}_s", 0.0) + stats.seconds
        (run_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    eval_config = EvalConfig(pool_dir=str(run_dir / "pool-dev"), max_new_tokens=args.max_new_tokens,
                             eval_batch_size=args.eval_batch_size, json=False)

    results = {}
    base_file = run_dir / "base" / "result.json"
    if not base_file.exists():
        tick = time.time()
        base = evaluate(model_config, dev_data, EvalConfig(**{**eval_config.__dict__, "compare_base": True}),
                        model=model, tokenizer=tokenizer)["base"]
        base_file.parent.mkdir(parents=True, exist_ok=True)
        base_file.write_text(json.dumps({"eval": summary(base), "eval_seconds": time.time() - tick}, indent=2))
    results["base"] = json.loads(base_file.read_text())
    del model

    for name in args.methods.split(","):
        result_file = run_dir / name / "result.json"
        if result_file.exists():
            results[name] = json.loads(result_file.read_text())
            continue
        tick = time.time()
        overrides = dict(METHODS[name])
        lora_r = overrides.pop("lora_r", args.lora_r)
        method_model_config = ModelConfig(precision=args.precision, lora_r=lora_r, lora_alpha=2 * lora_r)
        model, tokenizer = load_model(method_model_config, gradient_checkpointing=on_gpu)
        dft_config = DFTConfig(**{
            "output_dir": str(run_dir / name), "pool_dir": str(run_dir / "pool-train"), "num_negatives_per_step": 2,
            "num_train_epochs": 2, "per_device_train_batch_size": args.batch_size, "learning_rate": args.learning_rate,
            "seed": args.seed, "gradient_checkpointing": on_gpu, "save_strategy": "no", **overrides,
        })
        trained = train(method_model_config, train_data, dft_config, model=model, tokenizer=tokenizer)
        train_seconds = time.time() - tick
        tick = time.time()
        evaluated = evaluate(method_model_config, dev_data, EvalConfig(**{**eval_config.__dict__, "compare_base": False,
                                                                   "adapter_path": trained.adapter_path}),
                             model=model, tokenizer=tokenizer)["adapter"]
        result = {"eval": summary(evaluated), "train_seconds": train_seconds, "eval_seconds": time.time() - tick,
                  "config": METHODS[name], "adapter_path": trained.adapter_path}
        result_file.write_text(json.dumps(result, indent=2))
        results[name] = result
        del model

    for name in METHODS:  # rows from earlier invocations (e.g. the variants) stay in the table
        if name not in results and (run_dir / name / "result.json").exists():
            results[name] = json.loads((run_dir / name / "result.json").read_text())
    timings["total_s_this_invocation"] = time.time() - started
    (run_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    report = {"commit": code_commit, "args": vars(args), "timings": timings, "results": results}
    (run_dir / "results.json").write_text(json.dumps(report, indent=2))
    plot_all(run_dir, [m for m in results if (run_dir / m / "log_history.jsonl").exists()])
    print_table(results)
    print(json.dumps({"commit": code_commit, "results": {k: v["eval"] for k, v in results.items()}}))


def step_logs(run_dir: Path) -> list[dict]:
    """A run's per-step training log entries (log_history.jsonl without the eval and summary lines)."""
    logs = [json.loads(line) for line in open(run_dir / "log_history.jsonl")]
    return [entry for entry in logs if "loss" in entry and "step" in entry]


def plot_all(run_dir: Path, methods: list[str]):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no curves.png")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))  # one colour per method
    for name in sorted(methods, key=list(METHODS).index):
        logs = step_logs(run_dir / name)
        steps = [entry["step"] for entry in logs]
        for axis, key in zip(axes, ["pos_logp_per_token", "neg_logp_per_token", "loss"]):
            if all(key in entry for entry in logs):
                axis.plot(steps, [entry[key] for entry in logs], label=name, color=colors[name])
    for axis, title in zip(axes, ["gold (positive) log-lik / token", "negative log-lik / token", "training loss"]):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=110)


def print_table(results: dict):
    from rich.console import Console
    from rich.table import Table

    table = Table(title="GSM8K mini-replication (dev)")
    for column in ["method", "accuracy", "win rate", "gold logp/token", "neg logp/token", "train s", "eval s"]:
        table.add_column(column, justify="right")
    for name, result in results.items():
        e = result["eval"]
        table.add_row(name, f"{e['accuracy']:.1%} ({e['correct']}/{e['total']})", f"{e.get('win_rate', float('nan')):.1%}",
                      f"{e.get('gold_logp_per_token', float('nan')):.3f}", f"{e.get('negative_logp_per_token', float('nan')):.3f}",
                      f"{result.get('train_seconds', 0):.0f}", f"{result.get('eval_seconds', 0):.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
