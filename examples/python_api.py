"""dftlite's Python API end to end: sample negatives → DFT2 training → evaluation → export.

    python examples/python_api.py                                   # embedded SmolLM2-135M-Instruct; CPU is fine
    python examples/python_api.py --model HuggingFaceTB/SmolLM2-360M-Instruct --num_train 256   # a GPU run
    python examples/python_api.py --tiny path/to/tiny-model-dir     # seconds; what tests/test_recipes.py runs

DFT is Discriminative Fine-Tuning (Guo et al., ICML 2025, arXiv 2502.18679), not TRL's
loss_type="dft" (Dynamic Fine-Tuning). Each GSM8K problem x with its worked answer y is
contrasted with B answers y' that the frozen base model wrote for x under an adversarial system
message. The same steps as `dftlite sample / train / eval / export`, as library calls; the
model is loaded once and passed to each, because with its LoRA adapters switched off it *is*
the frozen base model: the sampler and the evaluation's "base" column need no second copy.

The defaults are about the size of `dftlite demo` (16 problems; 128 new tokens against the demo's 96; fp32 on CPU), so a CPU is enough.
Writes under --out: data/ (the GSM8K subsets), pool-train/ and pool-dev/ (negatives),
run/ (adapter, training log and curves, eval.json) and export/ (adapter + model card).
"""

from __future__ import annotations

import argparse
import json
from importlib.resources import files
from pathlib import Path

import torch

from dftlite.data import DataConfig
from dftlite.evaluate import EvalConfig, evaluate
from dftlite.export import ExportConfig, export
from dftlite.models import ModelConfig, load_model, native_bf16
from dftlite.sampling import SampleConfig, sample_pool
from dftlite.trainer import DFTConfig, train

GSM8K = files("dftlite") / "resources" / "gsm8k"  # bundled: GSM8K train and the first 300 test problems
B = 2  # negatives per prompt per step (paper: 2)


def write_subset(source, target: Path, count: int) -> Path:
    """The first `count` problems of a bundled GSM8K file, as JSONL."""
    lines = source.read_text().splitlines()[:count]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n")
    return target


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Hub id, local HF directory, .gguf file or the embedded alias")
    parser.add_argument("--precision", default=None, help="4bit, bf16, fp32, ... (default: 4bit on a GPU, fp32 on CPU)")
    parser.add_argument("--num_train", type=int, default=16, help="training problems")
    parser.add_argument("--num_eval", type=int, default=16, help="held-out problems")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="length cap of negatives and greedy answers")
    parser.add_argument("--epochs", type=int, default=2, help="E: the pool holds E × B negatives per problem")
    parser.add_argument("--out", default="runs/python_api", help="output directory")
    parser.add_argument("--tiny", metavar="MODEL_DIR", help="smoke test: this model, fp32, 4 problems, 8 new tokens, 1 epoch")
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.precision, args.num_train, args.num_eval, args.max_new_tokens, args.epochs = args.tiny, "fp32", 4, 2, 8, 1
    on_gpu = torch.cuda.is_available()
    precision = args.precision or ("4bit" if on_gpu else "fp32")
    out = Path(args.out)

    # Data: GSM8K question/answer records; the format is detected from the keys.
    train_data = DataConfig(data_path=str(write_subset(GSM8K / "train.jsonl", out / "data" / "train.jsonl", args.num_train)), max_length=384)
    dev_data = DataConfig(data_path=str(write_subset(GSM8K / "dev.jsonl", out / "data" / "dev.jsonl", args.num_eval)), max_length=384)

    # One model for every step: LoRA r16 on the base (QLoRA when precision is 4bit).
    model_config = ModelConfig(model_name_or_path=args.model, precision=precision, lora_r=16, lora_alpha=32)
    model, tokenizer = load_model(model_config, gradient_checkpointing=on_gpu)

    # 1. Negatives y' ~ P_g0(.|x̄) from the frozen base: E × B per training problem, B per held-out one.
    sample_pool(model_config, train_data, SampleConfig(pool_dir=str(out / "pool-train"), num_negatives=B * args.epochs,
                                                       max_new_tokens=args.max_new_tokens), model=model, tokenizer=tokenizer)
    sample_pool(model_config, dev_data, SampleConfig(pool_dir=str(out / "pool-dev"), num_negatives=B,
                                                     max_new_tokens=args.max_new_tokens), model=model, tokenizer=tokenizer)

    # 2. DFT2 (τ = 0.3, γ = 0.9: the paper's, the defaults). Each step: 4 prompts × (1 + B) sequences.
    dft_config = DFTConfig(
        output_dir=str(out / "run"), method="dft2", pool_dir=str(out / "pool-train"), num_negatives_per_step=B,
        num_train_epochs=args.epochs, per_device_train_batch_size=4, learning_rate=2e-4, save_strategy="no",
        gradient_checkpointing=on_gpu, bf16=native_bf16(),
    )
    result = train(model_config, train_data, dft_config, model=model, tokenizer=tokenizer)

    # 3. Held-out accuracy and win rate (gold answer vs its negatives), base and adapter side by side.
    eval_json = out / "run" / "eval.json"  # next to the adapter, so export puts it on the model card
    results = evaluate(model_config, dev_data, EvalConfig(adapter_path=result.adapter_path, pool_dir=str(out / "pool-dev"),
                                                          max_new_tokens=args.max_new_tokens, json_path=str(eval_json)),
                       model=model, tokenizer=tokenizer)

    # 4. The adapter (safetensors) with a model card; merge=True would also write merged weights.
    export_dir = export(model_config, ExportConfig(adapter_path=result.adapter_path, export_dir=str(out / "export"), overwrite=True))

    summary = {view: {k: results[view].get(k) for k in ("accuracy", "win_rate", "mean_margin")} for view in ("base", "adapter")}
    print(json.dumps({"held_out": summary, "adapter": result.adapter_path, "export": str(export_dir)}, indent=2))
    return {"results": results, "train": result, "export_dir": export_dir}


if __name__ == "__main__":
    main()
