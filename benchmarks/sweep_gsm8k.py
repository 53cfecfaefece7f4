"""Sweep of DFT2's knobs on GSM8K, scored on teacher-forced metrics (a benchmark, not a test).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sweep_gsm8k.py --configs sft,dft2          # one process per call
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sweep_gsm8k.py --accuracy sft,dft2_l0.5     # greedy accuracy too
    .venv/bin/python benchmarks/sweep_gsm8k.py --report                                     # table, JSON, figure only

The question (docs/results.md): which settings keep the gold answers' likelihood at SFT's level
while pushing the base model's negatives down? Every configuration trains the same LoRA on the
same 64 GSM8K problems for the same 32 steps (S = 4 prompts, 2 epochs, B = 2 negatives per step)
and is scored on the first 150 dev problems against the same 2 dev negatives each (sampled once
from the base under "You are an unhelpful assistant.", 128 new tokens):
  win rate, gold and negative log-likelihood per token, mean margin (`dftlite.evaluate.discrimination`).
These take about a minute; greedy accuracy (minutes) only runs for the configurations named in
--accuracy. fp32 LoRA (not 4-bit) and no gradient checkpointing, for speed on a CPU; a configuration
may set its own "precision" (e.g. 4bit), and then its base is scored at that precision too.

Everything lives under --run_dir (default runs/sweep, ignored by git):
  data/, pool-train/, pool-dev/, pool-train-nosys256/    shared inputs (sampling resumes)
  <name>/result.json     written last; a configuration with one is skipped (resume per configuration)
  <name>/log_history.jsonl, <name>/adapter
and the report goes to docs/sweep_results.json and docs/figures/sweep_pareto.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit  # noqa: E402
from replicate_gsm8k import GSM8K, REPO, step_logs, write_subset  # noqa: E402

# The training pools: name -> SampleConfig overrides. "nosys256" is the official MetaMathQA
# generator's setting (gen_mmqa.sh): no adversarial system message, 256 new tokens.
POOLS = {
    "adversarial128": {"max_new_tokens": 128},
    "nosys256": {"max_new_tokens": 256, "sampler_system_prompt": None},
}
# The configuration the library's DFT2 defaults and the CPU recipe follow (bold in the Pareto figure).
CHOSEN = "dft2_fb_lr2e-3_l2.5"
# The previous defaults, kept for comparison: u_init first_batch, LoRA dropout while scoring.
OLD = {"u_init": "first_batch", "scoring_dropout": True}
# name -> DFTConfig overrides (and "pool"). u_init and sft_weight (λ) are explicit: their defaults
# changed on this sweep's evidence. Unnamed settings are DFTConfig's defaults (DFT2: τ 0.3, γ 0.9, no
# dropout while scoring) and the fixed ones in `train_one`.
CONFIGS = {
    "sft": {"method": "sft"},
    "dft2": {"method": "dft2", "sft_weight": 0.0, "u_init": "one"},
    "dft2_old_defaults": {"method": "dft2", **OLD, "sft_weight": 0.0},
    "dft2_l0.1": {"method": "dft2", "sft_weight": 0.1, "u_init": "one"},
    "dft2_l0.5": {"method": "dft2", "sft_weight": 0.5, "u_init": "one"},
    "dft2_l1": {"method": "dft2", "sft_weight": 1.0, "u_init": "one"},
    "dft2_u_first_batch": {"method": "dft2", "u_init": "first_batch", "sft_weight": 0.0},
    "dft2_dropout": {"method": "dft2", "scoring_dropout": True, "sft_weight": 0.0, "u_init": "one"},
    "dft2_tau0.1": {"method": "dft2", "tau": 0.1, "sft_weight": 0.0, "u_init": "one"},
    "dft2_tau1": {"method": "dft2", "tau": 1.0, "sft_weight": 0.0, "u_init": "one"},
    "dft2_lr1e-4": {"method": "dft2", "learning_rate": 1e-4, "sft_weight": 0.0, "u_init": "one"},
    "dft2_lr5e-5": {"method": "dft2", "learning_rate": 5e-5, "sft_weight": 0.0, "u_init": "one"},
    "dft2_accum16": {"method": "dft2", "gradient_accumulation_steps": 4, "sft_weight": 0.0, "u_init": "one"},
    "dft2_nosys256": {"method": "dft2", "pool": "nosys256", "sft_weight": 0.0, "u_init": "one"},
    # combinations: u_init first_batch (strong negatives' term early) with the SFT anchor
    "dft2_fb_l0.5": {"method": "dft2", "u_init": "first_batch", "sft_weight": 0.5},
    "dft2_fb_l1": {"method": "dft2", "u_init": "first_batch", "sft_weight": 1.0},
    "dft2_fb_l0.25": {"method": "dft2", "u_init": "first_batch", "sft_weight": 0.25},
    "dft2_fb_tau0.1_l0.5": {"method": "dft2", "u_init": "first_batch", "tau": 0.1, "sft_weight": 0.5},
    # a larger step size: the 32 steps of this sweep are half the replication's 64
    "dft2_fb_lr5e-4": {"method": "dft2", "u_init": "first_batch", "learning_rate": 5e-4, "sft_weight": 0.0},
    "dft2_fb_lr5e-4_l0.5": {"method": "dft2", "u_init": "first_batch", "learning_rate": 5e-4, "sft_weight": 0.5},
    "dft2_lr5e-4_l0.5": {"method": "dft2", "learning_rate": 5e-4, "sft_weight": 0.5, "u_init": "one"},
    "sft_lr5e-4": {"method": "sft", "learning_rate": 5e-4},
    "dft2_fb_lr1e-3_l1": {"method": "dft2", "u_init": "first_batch", "learning_rate": 1e-3, "sft_weight": 1.0},
    # session 4: SFT at the best DFT2's step size (a fair reference), a heavier anchor, more negatives
    "sft_lr1e-3": {"method": "sft", "learning_rate": 1e-3},
    "dft2_fb_lr1e-3_l2": {"method": "dft2", "u_init": "first_batch", "learning_rate": 1e-3, "sft_weight": 2.0},
    "dft2_fb_lr1e-3_l1.5": {"method": "dft2", "u_init": "first_batch", "learning_rate": 1e-3, "sft_weight": 1.5},
    # the pool has 4 negatives per train prompt: B = 4 sees all of them in each of the 2 epochs
    "dft2_fb_lr1e-3_l2_b4": {"method": "dft2", "u_init": "first_batch", "learning_rate": 1e-3, "sft_weight": 2.0,
                             "num_negatives_per_step": 4, "allow_negative_reuse": True},
    # τ 0.1 puts the negatives' weight on the best-scoring negative, the one the win rate compares with
    "dft2_fb_lr1e-3_l2_tau0.1": {"method": "dft2", "u_init": "first_batch", "learning_rate": 1e-3, "sft_weight": 2.0,
                                 "tau": 0.1},
    # a larger step again (2e-4 -> 5e-4 -> 1e-3 moved the frontier out each time), and SFT at the same step
    "dft2_fb_lr2e-3_l2": {"method": "dft2", "u_init": "first_batch", "learning_rate": 2e-3, "sft_weight": 2.0},
    "sft_lr2e-3": {"method": "sft", "learning_rate": 2e-3},
    "dft2_fb_lr2e-3_l2.5": {"method": "dft2", "u_init": "first_batch", "learning_rate": 2e-3, "sft_weight": 2.5},
    "dft2_fb_lr2e-3_l3": {"method": "dft2", "u_init": "first_batch", "learning_rate": 2e-3, "sft_weight": 3.0},
    "dft2_fb_lr3e-3_l3": {"method": "dft2", "u_init": "first_batch", "learning_rate": 3e-3, "sft_weight": 3.0},
    "dft2_fb_lr3e-3_l4": {"method": "dft2", "u_init": "first_batch", "learning_rate": 3e-3, "sft_weight": 4.0},
    "sft_lr3e-3": {"method": "sft", "learning_rate": 3e-3},
    # session 3's default configuration (λ 1, lr 1e-3) and SFT on the 4-bit NF4 base: is fp32 a fair stand-in?
    "dft2_fb_lr1e-3_l1_4bit": {"method": "dft2", "u_init": "first_batch", "learning_rate": 1e-3, "sft_weight": 1.0,
                               "precision": "4bit"},
    "sft_lr1e-3_4bit": {"method": "sft", "learning_rate": 1e-3, "precision": "4bit"},
    "dft_train_prompt": {"method": "dft", "reference": "train_prompt"},
    "dft_sampler_prompt": {"method": "dft", "reference": "sampler_prompt"},
}


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default="runs/sweep")
    parser.add_argument("--configs", default="", help="comma-separated names of CONFIGS to train and score")
    parser.add_argument("--extra", default="{}",
                        help='JSON {name: overrides} of configurations beyond CONFIGS, e.g. combinations of the best')
    parser.add_argument("--accuracy", default="", help="comma-separated names (or base) to also decode greedily")
    parser.add_argument("--report", action="store_true", help="only write docs/sweep_results.json and the figures")
    parser.add_argument("--curves", default="sft,dft2",
                        help="configurations whose training curves go into docs/figures/sweep_curves.png")
    parser.add_argument("--num_train", type=int, default=64)
    parser.add_argument("--num_dev", type=int, default=150)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--max_length", type=int, default=448)
    parser.add_argument("--max_new_tokens", type=int, default=160, help="greedy answers (accuracy)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main():
    args = parse()
    run_dir = Path(args.run_dir)
    configs = {**CONFIGS, **json.loads(args.extra)}
    if not args.report:
        inputs = Inputs(args, run_dir)
        for name in [n for n in args.configs.split(",") if n]:
            if not (run_dir / name / "result.json").exists():
                train_one(args, inputs, name, configs[name])
        for name in [n for n in args.accuracy.split(",") if n]:
            add_accuracy(args, inputs, name)
    report(run_dir, configs)
    curves_figure(run_dir, [n for n in args.curves.split(",") if (run_dir / n / "log_history.jsonl").exists()],
                  REPO / "docs" / "figures" / "sweep_curves.png")


class Inputs:
    """The data subsets, the fp32 base model and the pools every configuration shares."""

    def __init__(self, args, run_dir: Path):
        from dftlite.data import DataConfig
        from dftlite.models import ModelConfig

        self.args, self.run_dir = args, run_dir
        train_path = write_subset(GSM8K / "train.jsonl", run_dir / "data" / "train.jsonl", args.num_train)
        dev_path = write_subset(GSM8K / "dev.jsonl", run_dir / "data" / "dev.jsonl", args.num_dev,
                                start=getattr(args, "dev_start", 0))
        self.model_config = ModelConfig(precision=args.precision, lora_r=16, lora_alpha=32)
        self.train_data = DataConfig(data_path=str(train_path), max_length=args.max_length)
        self.dev_data = DataConfig(data_path=str(dev_path), max_length=args.max_length)
        self.timings_path = run_dir / "timings.json"

    def pool(self, model, tokenizer, split: str, kind: str = "adversarial128") -> str:
        """Sample (or resume) a pool; seconds spent are summed over invocations in timings.json."""
        from dftlite.sampling import SampleConfig, sample_pool

        pool_dir = self.run_dir / (f"pool-{split}" if kind == "adversarial128" else f"pool-{split}-{kind}")
        data, count = (self.train_data, 4) if split == "train" else (self.dev_data, 2)
        config = SampleConfig(pool_dir=str(pool_dir), num_negatives=count, seed=self.args.seed, score_train_prompt=True,
                              **POOLS[kind])
        stats = sample_pool(self.model_config, data, config, model=model, tokenizer=tokenizer)
        timings = json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}
        key = f"sampling_{pool_dir.name}_s"
        timings[key] = timings.get(key, 0.0) + stats.seconds
        self.timings_path.write_text(json.dumps(timings, indent=2))
        return str(pool_dir)


def teacher_forced(model, tokenizer, inputs: Inputs, dev_pool: str) -> dict:
    from dftlite.data import load_data
    from dftlite.evaluate import discrimination
    from dftlite.pool import load_pool

    _, records = load_pool(dev_pool)
    result = discrimination(model, tokenizer, load_data(inputs.dev_data), records, inputs.dev_data.template, 16)
    result.pop("scores")
    return result


def train_one(args, inputs: Inputs, name: str, overrides: dict):
    from dftlite.models import load_model, sampler_view
    from dftlite.trainer import DFTConfig, train

    overrides = dict(overrides)
    kind = overrides.pop("pool", "adversarial128")
    precision = overrides.pop("precision", args.precision)
    model_config = dataclasses.replace(inputs.model_config, precision=precision)
    model, tokenizer = load_model(model_config, gradient_checkpointing=False)
    dev_pool = inputs.pool(model, tokenizer, "dev")
    if not (inputs.run_dir / "base" / "result.json").exists():
        with sampler_view(model):
            base = teacher_forced(model, tokenizer, inputs, dev_pool)
        write_result(inputs.run_dir / "base", {"name": "base", "method": "base", "settings": {}, "commit": commit(),
                                               "eval": base})
    base_eval = None
    if precision != args.precision:  # the base at this precision, to compare with the shared base row
        with sampler_view(model):
            base_eval = teacher_forced(model, tokenizer, inputs, dev_pool)
    train_pool = inputs.pool(model, tokenizer, "train", kind)
    settings = {"output_dir": str(inputs.run_dir / name), "pool_dir": train_pool, "num_negatives_per_step": 2,
                "num_train_epochs": 2, "per_device_train_batch_size": 4, "learning_rate": args.learning_rate,
                "seed": args.seed, "gradient_checkpointing": False, "save_strategy": "no", **overrides}
    config = DFTConfig(**settings)
    tick = time.time()
    trained = train(model_config, inputs.train_data, config, model=model, tokenizer=tokenizer)
    train_seconds = time.time() - tick
    tick = time.time()
    evaluated = teacher_forced(model, tokenizer, inputs, dev_pool)
    resolved = {k: getattr(config, k) for k in ("method", "tau", "gamma", "u_init", "scoring_dropout", "sft_weight",
                                                "reference", "learning_rate", "gradient_accumulation_steps",
                                                "num_negatives_per_step")}
    resolved["precision"] = precision
    resolved["prompts_per_update"] = 4 * config.gradient_accumulation_steps
    resolved["negatives"] = kind
    write_result(inputs.run_dir / name, {
        "name": name, "method": config.method, "settings": resolved, "commit": commit(), "eval": evaluated,
        "train_seconds": train_seconds, "eval_seconds": time.time() - tick, "adapter_path": trained.adapter_path,
        **({"base_eval": base_eval} if base_eval else {}),
    })


def add_accuracy(args, inputs: Inputs, name: str):
    """Greedy accuracy, the share of answers with a `####` line and their mean length (in tokens)."""
    from dftlite.data import load_data
    from dftlite.evaluate import accuracy
    from dftlite.models import load_model, sampler_view

    path = inputs.run_dir / name / "result.json"
    result = json.loads(path.read_text())
    if "accuracy" in result:
        return
    tick = time.time()
    if name == "base":  # the base is the sampler view of the model without an adapter
        model, tokenizer = load_model(inputs.model_config, trainable=False)
        view = sampler_view(model)
    else:
        model, tokenizer = load_model(inputs.model_config, adapter_path=result["adapter_path"], trainable=False)
        view = contextlib.nullcontext()
    with view:
        measured = accuracy(model, tokenizer, load_data(inputs.dev_data), inputs.dev_data.template, args.max_new_tokens, 32)
    answer_tokens = [len(tokenizer(p["output"])["input_ids"]) for p in measured["predictions"]]
    result["accuracy"] = accuracy_record(measured, answer_tokens, args.max_new_tokens, tick)
    write_result(inputs.run_dir / name, result)


def accuracy_record(measured: dict, answer_tokens: list[int], max_new_tokens: int, tick: float, **extra) -> dict:
    """The "accuracy" entry of a run's result.json: `evaluate.accuracy`'s counts, the Wilson interval, the share of
    answers with a `####` line and their mean length in tokens (`answer_tokens`, per answer)."""
    from dftlite.demo import wilson_interval

    outputs = [p["output"] for p in measured["predictions"]]
    return {
        "accuracy": measured["accuracy"], "correct": measured["correct"], "total": measured["total"],
        "interval_95": list(wilson_interval(measured["correct"], measured["total"])),
        "format_share": sum("####" in o for o in outputs) / len(outputs),
        "mean_answer_tokens": sum(answer_tokens) / len(answer_tokens),
        "max_new_tokens": max_new_tokens, **extra, "commit": commit(), "seconds": time.time() - tick,
    }


def write_result(directory: Path, result: dict):
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(directory / "result.json")


def report(run_dir: Path, configs: dict):
    rows = []
    for name in ["base", *configs]:
        path = run_dir / name / "result.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        e = result["eval"]
        row = {"name": name, "method": result["method"], "settings": result["settings"], "commit": result["commit"],
               "win_rate": e["win_rate"], "gold_logp_per_token": e["gold_logp_per_token"],
               "negative_logp_per_token": e["negative_logp_per_token"], "mean_margin": e["mean_margin"],
               "num_prompts": e["num_prompts"], "train_seconds": result.get("train_seconds")}
        if "base_eval" in result:  # a configuration at another precision: its own base, for comparison
            row["base_at_precision"] = {k: result["base_eval"][k] for k in
                                        ("win_rate", "gold_logp_per_token", "negative_logp_per_token", "mean_margin")}
        if "accuracy" in result:
            row.update({k: result["accuracy"][k] for k in ("accuracy", "correct", "total", "interval_95", "format_share",
                                                          "mean_answer_tokens")})
        rows.append(row)
    if not rows:
        print("nothing measured yet")
        return
    (REPO / "docs" / "sweep_results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{'name':<24}{'win':>7}{'gold':>9}{'neg':>9}{'margin':>9}{'acc':>8}{'train s':>9}")
    for r in rows:
        acc = f"{r['correct']}/{r['total']}" if "accuracy" in r else ""
        print(f"{r['name']:<24}{r['win_rate']:>7.1%}{r['gold_logp_per_token']:>9.3f}{r['negative_logp_per_token']:>9.3f}"
              f"{r['mean_margin']:>9.3f}{acc:>8}{r['train_seconds'] or 0:>9.0f}")
    print(markdown_table(rows))
    pareto_figure(rows, REPO / "docs" / "figures" / "sweep_pareto.png")


def markdown_table(rows: list[dict]) -> str:
    """The table docs/results.md shows (settings that differ between rows, and the teacher-forced metrics)."""
    lines = ["| configuration | method | u_init | λ | τ | lr | prompts/update | B | win rate | gold log-lik/token "
             "| negatives | margin | train s |", "|" + "---|" * 13]
    for r in rows:
        s = r["settings"]
        cells = [r["name"] if r["name"] != "base" else "base (no training)", r["method"]]
        if r["method"] in ("dft", "dft2"):
            cells += [s.get("u_init", ""), f"{s.get('sft_weight', '')}", f"{s.get('tau', '')}"]
        else:
            cells += ["", "", ""]
        # B: rows recorded before num_negatives_per_step was stored ran at train_one's fixed 2
        cells += [f"{s['learning_rate']:g}" if "learning_rate" in s else "", f"{s.get('prompts_per_update', '')}",
                  f"{s.get('num_negatives_per_step', 2)}" if r["method"] in ("dft", "dft2") else "",
                  f"{r['win_rate']:.1%}", f"{r['gold_logp_per_token']:.3f}", f"{r['negative_logp_per_token']:.3f}",
                  f"{r['mean_margin']:.3f}", f"{r['train_seconds']:.0f}" if r["train_seconds"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_figure(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(9, 6))
    for r in rows:
        reference = r["method"] in ("base", "sft")
        quantized = r["settings"].get("precision", "fp32") != "fp32"  # another base: not comparable with the region
        color = "black" if reference else ("tab:orange" if r["method"] == "dft" else "tab:blue")
        axis.scatter(r["gold_logp_per_token"], r["win_rate"], marker="*" if reference else "o", s=160 if reference else 40,
                     facecolors="none" if quantized else color, edgecolors=color)
        axis.annotate(r["name"], (r["gold_logp_per_token"], r["win_rate"]), fontsize=7, xytext=(4, 3),
                      textcoords="offset points", fontweight="bold" if r["name"] == CHOSEN else "normal")
    fp32_sft = [r for r in rows if r["method"] == "sft" and r["settings"].get("precision", "fp32") == "fp32"]
    if fp32_sft:  # the goal region: win rate ≥ 85% and gold within 0.10 nats of the best (fp32) SFT row
        best = max(r["gold_logp_per_token"] for r in fp32_sft)
        right = max(r["gold_logp_per_token"] for r in rows) + 0.02
        axis.fill_between([best - 0.10, right], 0.85, 1.0, color="tab:green", alpha=0.12, label="goal region")
        axis.axvline(best, color="tab:green", linestyle=":", linewidth=1, label="best SFT's gold log-likelihood")
        axis.legend(fontsize=8, loc="lower right")
    axis.set_xlabel("gold answers' log-likelihood per token (dev, higher is better)")
    axis.set_ylabel("win rate against base negatives (dev)")
    axis.set_title("GSM8K sweep, SmolLM2-135M LoRA, 150 dev problems\n"
                   f"(stars: base, SFT; hollow: 4-bit base, not comparable on the x axis; bold: {CHOSEN}, the default)",
                   fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def curves_figure(run_dir: Path, names: list[str], path: Path):
    """Per-step log-likelihood per token of the positives (solid) and negatives (dashed), as the paper's Figure 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not names:
        return
    fig, axis = plt.subplots(figsize=(8, 4.5))
    for name, color in zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        logs = step_logs(run_dir / name)
        steps = [entry["step"] for entry in logs]
        axis.plot(steps, [entry["pos_logp_per_token"] for entry in logs], color=color, label=f"{name}: gold answers")
        if all("neg_logp_per_token" in entry for entry in logs):
            axis.plot(steps, [entry["neg_logp_per_token"] for entry in logs], color=color, linestyle="--",
                      label=f"{name}: negatives")
    axis.set_xlabel("step (4 training prompts each)")
    axis.set_ylabel("log-likelihood per token (training batch)")
    axis.set_title("Training curves, GSM8K sweep (cf. the paper's Figure 3)")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
