"""Throughput of the negative-pool sampler: batched `sample_pool` vs a per-prompt generate loop.

    .venv/bin/python benchmarks/sampling_throughput.py                    # 8 GSM8K prompts x 4 x 64 tokens
    .venv/bin/python benchmarks/sampling_throughput.py --prompts 16 --max_new_tokens 128 --threads 1

Both sides use the embedded SmolLM2-135M-Instruct in fp32 (CPU) or bf16 (GPU) and the same
sampler prompt x̄ and sampling settings (T=0.7, top-k 50, top-p 1.0). The baseline calls
`model.generate` once per completion (num_return_sequences=1, m calls per prompt), with
transformers' own sampling; `sample_pool` is timed end to end (data, rendering, generation,
log-probs, writing the pool). Tokens are completion tokens up to and including the EOS.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from dftlite.data import DataConfig, encode_prompt, load_data, render_prompt
from dftlite.models import ModelConfig, load_model, sampler_view
from dftlite.models import stop_token_ids
from dftlite.sampling import SampleConfig, sample_pool

GSM8K = Path(__file__).resolve().parent.parent / "dftlite" / "resources" / "gsm8k" / "train.jsonl"


def unbatched_loop(model, tokenizer, examples, config: SampleConfig) -> tuple[int, float]:
    """m generate calls per prompt, one completion each; returns (completion tokens, seconds)."""
    eos_ids = stop_token_ids(model, tokenizer)
    tokens, started = 0, time.perf_counter()
    with sampler_view(model), torch.no_grad():
        for example in examples:
            text = render_prompt(tokenizer, example.prompt, "chat", config.sampler_system_prompt)
            input_ids = torch.tensor([encode_prompt(tokenizer, text, "chat")], device=model.device)
            for _ in range(config.num_negatives):
                out = model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                    temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                    max_new_tokens=config.max_new_tokens, num_return_sequences=1, pad_token_id=tokenizer.pad_token_id,
                )
                completion = out[0, input_ids.shape[1]:].tolist()
                ends = [t for t, token in enumerate(completion) if token in eos_ids]
                tokens += ends[0] + 1 if ends else len(completion)
    return tokens, time.perf_counter() - started


def measure(model, tokenizer, model_config: ModelConfig, prompts: int, num_negatives: int, max_new_tokens: int,
            work_dir: str) -> dict:
    """Time the per-completion generate loop, then `sample_pool` (what `dftlite sample` runs), on the
    first `prompts` GSM8K problems; return tokens, seconds and tokens/s of each and their ratio."""
    data_config = DataConfig(data_path=str(GSM8K), max_examples=prompts)
    examples = load_data(data_config)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        config = SampleConfig(pool_dir=os.path.join(tmp, "pool"), num_negatives=num_negatives,
                              max_new_tokens=max_new_tokens)
        # warm-up (first-call allocations, kernel selection), not timed
        warm = SampleConfig(pool_dir=os.path.join(tmp, "warm"), num_negatives=1, max_new_tokens=4)
        sample_pool(model_config, DataConfig(data_path=str(GSM8K), max_examples=1), warm, model=model, tokenizer=tokenizer)

        unbatched_tokens, unbatched_seconds = unbatched_loop(model, tokenizer, examples, config)
        started = time.perf_counter()
        stats = sample_pool(model_config, data_config, config, model=model, tokenizer=tokenizer)
        batched_seconds = time.perf_counter() - started
    batched_rate = stats.new_tokens / batched_seconds
    unbatched_rate = unbatched_tokens / unbatched_seconds
    return {
        "device": str(model.device), "torch_threads": torch.get_num_threads(), "prompts": prompts,
        "num_negatives": num_negatives, "max_new_tokens": max_new_tokens,
        "batched_tokens": stats.new_tokens, "batched_seconds": round(batched_seconds, 2),
        "batched_tokens_per_s": round(batched_rate, 1),
        "unbatched_tokens": unbatched_tokens, "unbatched_seconds": round(unbatched_seconds, 2),
        "unbatched_tokens_per_s": round(unbatched_rate, 1),
        "ratio": round(batched_rate / unbatched_rate, 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--num_negatives", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        # On a shared machine, 2 OpenMP threads on 2 busy cores spin at barriers; 1 thread is steadier.
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    precision = "bf16" if torch.cuda.is_available() else "fp32"
    model_config = ModelConfig(precision=precision, lora_r=0)
    model, tokenizer = load_model(model_config)
    result = measure(model, tokenizer, model_config, args.prompts, args.num_negatives, args.max_new_tokens, None)
    print(json.dumps({
        "model": "smollm2-135m-instruct", "precision": precision, **result, "cpu_count": os.cpu_count(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }))


if __name__ == "__main__":
    main()
