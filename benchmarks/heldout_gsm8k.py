"""The CPU default (DFT2, λ 2.5, lr 2e-3) and SFT at its best lr, 3 training seeds each, scored on dev
problems 151–300: the problems no sweep configuration was chosen on (a benchmark, not a test).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/heldout_gsm8k.py               # train and score (~40 min, 2 cores)
    OMP_NUM_THREADS=2 .venv-vllm/bin/python benchmarks/heldout_gsm8k.py --accuracy  # greedy accuracy, on vLLM
    .venv/bin/python benchmarks/heldout_gsm8k.py --report                       # table and JSON only

benchmarks/sweep_gsm8k.py chose the default among about 30 configurations on dev problems 1–150 and
reports it there. This script repeats the two rows that the headline compares, with everything the
sweep fixes (64 train problems, 32 steps, S = 4, B = 2, fp32 LoRA r 16, max_length 448, the train pool
sampled once with seed 0), on dev problems 151–300 with their own pool (2 negatives each, sampled
once from the base under "You are an unhelpful assistant.", 128 new tokens, seed 0). Only the
training seed (LoRA initialisation, data order, negative draws) changes between the 3 runs of a
configuration. Each run gets the teacher-forced metrics and greedy accuracy (160 new tokens). The
greedy answers of the base and the six adapters come from one vLLM engine (fp32, each adapter as a
LoRA): `generate` decodes 7 × 150 × 160 tokens in about an hour on 2 cores; tests/test_engine_vllm.py
checks that the two engines' greedy answers agree.

Everything lives under --run_dir (default runs/heldout, ignored by git); per run
<name>/result.json as in the sweep, and the summary goes to docs/heldout_results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replicate_gsm8k import REPO  # noqa: E402
from sweep_gsm8k import CONFIGS, Inputs, accuracy_record, train_one, write_result  # noqa: E402

SEEDS = (0, 1, 2)
# The sweep's rows that the headline compares: the chosen default and the best SFT (its best gold
# log-likelihood on problems 1–150 is at lr 2e-3, -1.0948, a hair above lr 1e-3's -1.0951).
ROWS = {"dft2_default": CONFIGS["dft2_fb_lr2e-3_l2.5"], "sft_lr2e-3": CONFIGS["sft_lr2e-3"]}
METRICS = ("win_rate", "gold_logp_per_token", "negative_logp_per_token", "mean_margin", "accuracy")


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default="runs/heldout")
    parser.add_argument("--report", action="store_true", help="only write docs/heldout_results.json")
    parser.add_argument("--accuracy", action="store_true", help="only add greedy accuracy (vLLM) to the finished runs")
    args = parser.parse_args()
    # The sweep's fixed settings (sweep_gsm8k.parse's defaults), on dev problems 151–300
    args.num_train, args.num_dev, args.dev_start = 64, 150, 150
    args.precision, args.learning_rate, args.max_length, args.max_new_tokens, args.seed = "fp32", 2e-4, 448, 160, 0
    return args


def main():
    args = parse()
    run_dir = Path(args.run_dir)
    runs = {f"{row}_seed{seed}": {**overrides, "seed": seed} for row, overrides in ROWS.items() for seed in SEEDS}
    if args.accuracy:
        add_vllm_accuracy(args, run_dir, ["base", *runs])
    elif not args.report:
        inputs = Inputs(args, run_dir)
        for name, overrides in runs.items():
            if not (run_dir / name / "result.json").exists():
                train_one(args, inputs, name, overrides)
    report(run_dir, runs)


def add_vllm_accuracy(args, run_dir: Path, names: list[str]):
    """Greedy accuracy of each finished run (and the base) on one vLLM engine, the adapters as LoRAs; the
    same fields as sweep_gsm8k.add_accuracy writes."""
    from dftlite.data import DataConfig, encode_prompt, load_data, render_prompt
    from dftlite.engine_vllm import VLLMEngine, base_metadata
    from dftlite.evaluate import _numeric, accuracy
    from dftlite.models import ModelConfig

    model_config = ModelConfig(precision=args.precision, lora_r=16, lora_alpha=32)
    examples = load_data(DataConfig(data_path=str(run_dir / "data" / "dev.jsonl"), max_length=args.max_length))
    path, tokenizer, _, eos_ids = base_metadata(model_config)
    prompt_ids = [encode_prompt(tokenizer, render_prompt(tokenizer, e.prompt, "chat"), "chat") for e, _ in _numeric(examples)]
    todo = [n for n in names if (run_dir / n / "result.json").exists()
            and "accuracy" not in json.loads((run_dir / n / "result.json").read_text())]
    if not todo:
        return
    engine = VLLMEngine(path, dtype="float32", max_model_len=max(map(len, prompt_ids)) + args.max_new_tokens,
                        enable_lora=True, max_lora_rank=16)
    try:
        for name in todo:
            result = json.loads((run_dir / name / "result.json").read_text())
            tick = time.time()
            tokens = engine.greedy(prompt_ids, max_new_tokens=args.max_new_tokens, eos_ids=eos_ids,
                                   lora_path=None if name == "base" else result["adapter_path"])
            measured = accuracy(None, tokenizer, examples, outputs=[tokenizer.decode(t, skip_special_tokens=True) for t in tokens])
            result["accuracy"] = accuracy_record(measured, [len(t) for t in tokens], args.max_new_tokens, tick, engine="vllm")
            write_result(run_dir / name, result)
            print(f"{name}: {measured['correct']}/{measured['total']} correct", flush=True)
    finally:
        engine.close()


def report(run_dir: Path, runs: dict):
    def metrics(name):
        result = json.loads((run_dir / name / "result.json").read_text())
        values = {k: result["eval"][k] for k in METRICS if k in result["eval"]}
        if "accuracy" in result:
            values["accuracy"] = result["accuracy"]["accuracy"]
        return {"name": name, "commit": result["commit"], "settings": result["settings"], **values}

    done = [name for name in runs if (run_dir / name / "result.json").exists()]
    rows = [metrics(name) for name in ["base", *done] if (run_dir / name / "result.json").exists()]
    summary = {}
    for row in ROWS:
        seeds = [r for r in rows if r["name"].startswith(row + "_seed")]
        if not seeds:
            continue
        summary[row] = {"runs": len(seeds)}
        for key in METRICS:
            values = [r[key] for r in seeds if key in r]
            if values:
                summary[row][key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                                     "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    out = {"problems": "dev 151-300 (0-based 150-299 of dftlite/resources/gsm8k/dev.jsonl)", "seeds": list(SEEDS),
           "runs": rows, "summary": summary}
    (REPO / "docs" / "heldout_results.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'name':<22}{'win':>8}{'gold':>9}{'neg':>9}{'margin':>9}{'acc':>8}")
    for r in rows:
        print(f"{r['name']:<22}{r['win_rate']:>8.1%}{r['gold_logp_per_token']:>9.3f}{r['negative_logp_per_token']:>9.3f}"
              f"{r['mean_margin']:>9.3f}{r.get('accuracy', float('nan')):>8.3f}")
    for row, s in summary.items():
        cells = "  ".join(f"{k} {v['mean']:.4f} [{v['min']:.4f}, {v['max']:.4f}] sd {v['sd']:.4f}"
                          for k, v in s.items() if k != "runs")
        print(f"{row} ({s['runs']} seeds): {cells}")


if __name__ == "__main__":
    main()
