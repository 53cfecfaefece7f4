"""Export a trained adapter: PEFT adapter (safetensors), optionally a merged model, a model card, the Hub.

    dftlite export --adapter_path runs/demo/run/adapter --export_dir out/demo
    dftlite export --adapter_path runs/demo/run/adapter --export_dir out/demo --merge --merge_dtype bf16
    HF_TOKEN=hf_... dftlite export --adapter_path runs/demo/run/adapter --export_dir out/demo --push_to_hub me/demo-dft2

Layout of export_dir (weights are safetensors only, everywhere):
    adapter_config.json, adapter_model.safetensors   the LoRA adapter; PeftModel.from_pretrained(base, export_dir)
    tokenizer files
    dftlite_config.yaml   the training run's resolved config, when found next to the adapter or one level up
    export_config.yaml    this export's resolved config
    eval.json, ...        metrics files found next to the adapter or in the run directory
    README.md             model card: method, hyperparameters, data, metrics, how to load
    merged/               with merge=True: a plain transformers model (adapter folded into the weights).
                          It is a subfolder because transformers loads a folder holding adapter_config.json
                          as an adapter, not as the merged weights.

The adapter is copied byte for byte (a legacy adapter_model.bin is converted to safetensors). Merging
never touches quantized weights: when the model config says 4bit/8bit (QLoRA training), the base is
reloaded unquantized in merge_dtype and the adapter is folded into that.

The export is built in a temporary sibling directory and renamed into place at the end, so a failed
export leaves nothing half-written, and export_dir is locked meanwhile (`dftlite.outputs`): a second
export into it stops at once. The upload is one Hub commit: the repo gets the whole export or none.
The Hub token is read from $HF_TOKEN only, passed to huggingface_hub, and never written: the export
is checked for it before it is kept or uploaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml

from dftlite.config import ConfigError, save_resolved_config
from dftlite.models import ModelConfig, load_base_model, load_tokenizer, resolve_model_path, resolve_model_source
from dftlite.outputs import disk_full_guard, output_lock, staged_directory

logger = logging.getLogger(__name__)

PAPER = "https://arxiv.org/abs/2502.18679"
TRAINING_CONFIG = "dftlite_config.yaml"
EXPORT_CONFIG = "export_config.yaml"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
METRIC_FILES = ("eval.json", "metrics.json", "all_results.json", "train_results.json", "eval_results.json")
MERGED_SUBDIR = "merged"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# TrainingArguments fields worth showing on a model card; the others (logging, saving, hub, ...) are not.
CARD_TRAINING_ARGS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "lr_scheduler_type", "warmup_ratio", "warmup_steps", "weight_decay", "optim", "seed", "bf16", "fp16",
)
CARD_DATA_KEYS = ("data_path", "data_format", "data_split", "template", "max_length", "max_examples", "pool_dir",
                  "eval_data_path", "eval_pool_dir")
CARD_SKIP_KEYS = ("model_name_or_path", "cache_dir", "output_dir", "logging_dir", "trust_remote_code")
# Settings that only some methods use (dft_config.py's help texts); the card leaves out the others.
METHOD_ONLY_KEYS = {
    "tau": ("dft", "dft2"), "gamma": ("dft", "dft2"), "u_init": ("dft", "dft2"), "reference": ("dft",),
    "beta": ("simpo", "simpo_sft", "dpo"), "simpo_gamma_beta_ratio": ("simpo", "simpo_sft"), "sft_weight": ("dft", "dft2", "simpo_sft"),
}
METHOD_NOTES = {
    "dft2": "DFT2, the paper's practical variant: a sequence's score is its mean token log-probability.",
    "dft": "DFT: a sequence's score is its summed log-probability; negatives are importance-weighted by 1/P_g0.",
    "sft": "a baseline, not DFT: supervised fine-tuning on the gold answers.",
    "simpo": "a baseline, not DFT: SimPO with the gold answer as chosen and pool negatives as rejected.",
    "simpo_sft": "a baseline, not DFT: SimPO plus an SFT term.",
    "dpo": "a baseline, not DFT: DPO with pool negatives as rejected (as in SPIN).",
}


@dataclass
class ExportConfig:
    adapter_path: str = field(
        default="", metadata={"help": "PEFT adapter directory to export (a training run's <output_dir>/adapter). Required."}
    )
    export_dir: str = field(default="", metadata={"help": "Output directory; must be empty or new unless overwrite. Required."})
    merge: bool = field(
        default=False, metadata={"help": "Also write the adapter merged into the base weights (subfolder merged/)."}
    )
    merge_dtype: Literal["bf16", "fp16", "fp32"] = field(
        default="bf16", metadata={"help": "dtype of the merged weights; the base is loaded unquantized in it (never 4-bit)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty export_dir."})
    push_to_hub: str | None = field(
        default=None, metadata={"help": "Hub repo id (user/name) to upload export_dir to; token from $HF_TOKEN."}
    )
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})

    def __post_init__(self):
        if not self.adapter_path:
            raise ValueError("adapter_path is required: the PEFT adapter directory to export")
        if not self.export_dir:
            raise ValueError("export_dir is required: the directory to write the export to")
        if self.merge_dtype not in DTYPES:
            raise ValueError(f"merge_dtype must be one of {tuple(DTYPES)}, got {self.merge_dtype!r}")
        self.push_to_hub = self.push_to_hub or None
        if self.push_to_hub is not None and not re.fullmatch(r"([\w.-]+/)?[\w.-]+", self.push_to_hub):
            raise ValueError(f"push_to_hub must be a Hub repo id like 'user/name', got {self.push_to_hub!r}")


def export(model_config: ModelConfig, export_config: ExportConfig) -> Path:
    """Write the export described in the module docstring; push it when asked. Returns export_dir."""
    from rich.console import Console

    adapter_dir, export_dir = Path(export_config.adapter_path), Path(export_config.export_dir)
    _check_inputs(adapter_dir, export_dir, export_config)
    token = os.environ.get("HF_TOKEN") or None
    if export_config.push_to_hub is not None and token is None:
        raise ConfigError("push_to_hub needs a Hub token in the environment variable HF_TOKEN")
    training_config_path = _find(adapter_dir, [TRAINING_CONFIG])
    training_config = yaml.safe_load(training_config_path.read_text()) if training_config_path else None
    if training_config and training_config.get("model_name_or_path") not in (None, model_config.model_name_or_path):
        logger.warning(
            "the adapter was trained on %r (%s) but the export uses model_name_or_path=%r",
            training_config["model_name_or_path"], training_config_path, model_config.model_name_or_path,
        )

    with output_lock(export_dir, "export_dir"):  # one export into export_dir at a time, through the upload
        _check_inputs(adapter_dir, export_dir, export_config)  # again, now that no other export can write it
        with disk_full_guard(export_dir, "the export"), staged_directory(export_dir) as tmp:  # whole, or nothing
            _copy_adapter(adapter_dir, tmp)
            _load_export_tokenizer(adapter_dir, model_config).save_pretrained(tmp)
            if training_config_path is not None:
                shutil.copyfile(training_config_path, tmp / TRAINING_CONFIG)
            save_resolved_config(tmp, model_config, export_config, name=EXPORT_CONFIG)
            metrics = {}
            for name in METRIC_FILES:
                path = _find(adapter_dir, [name])
                if path is not None:
                    shutil.copyfile(path, tmp / name)
                    metrics[name] = json.loads(path.read_text())
            if export_config.merge:
                _write_merged(model_config, adapter_dir, tmp / MERGED_SUBDIR, export_config.merge_dtype)
            adapter_config = json.loads((tmp / "adapter_config.json").read_text())
            (tmp / "README.md").write_text(model_card(model_config, export_config, adapter_config, training_config, metrics))
            _check_written(tmp, token)
        console = Console()
        merged = f" (merged, {export_config.merge_dtype}, in {export_dir / MERGED_SUBDIR})" if export_config.merge else ""
        console.print(f"exported {adapter_dir} to {export_dir}{merged}")
        if export_config.push_to_hub is not None:  # one Hub commit: the repo gets the whole export or none of it
            url = push(export_dir, export_config.push_to_hub, export_config.private, token)
            console.print(f"uploaded to {url}")
    return export_dir


def _check_inputs(adapter_dir: Path, export_dir: Path, config: ExportConfig):
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {adapter_dir}")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no PEFT adapter in {adapter_dir} (adapter_config.json missing)")
    if not any((adapter_dir / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FileNotFoundError(f"no adapter weights in {adapter_dir} (adapter_model.safetensors missing)")
    if export_dir.exists() and not export_dir.is_dir():
        raise FileExistsError(f"export_dir {export_dir} exists and is not a directory")
    resolved = export_dir.resolve()
    if resolved == adapter_dir.resolve() or resolved in adapter_dir.resolve().parents:
        raise ConfigError(f"export_dir {export_dir} holds the adapter {adapter_dir}; choose a directory outside it")
    if export_dir.is_dir() and any(export_dir.iterdir()) and not config.overwrite:
        raise FileExistsError(f"export_dir {export_dir} is not empty; choose another directory or set --overwrite")


def _find(adapter_dir: Path, names: list[str]) -> Path | None:
    """The first of `names` in the adapter directory, else in the run directory one level up."""
    for directory in (adapter_dir, adapter_dir.parent):
        for name in names:
            if (directory / name).is_file():
                return directory / name
    return None


def _copy_adapter(adapter_dir: Path, target: Path):
    """adapter_config.json + adapter_model.safetensors, byte for byte (a legacy .bin is converted)."""
    shutil.copyfile(adapter_dir / "adapter_config.json", target / "adapter_config.json")
    if (adapter_dir / "adapter_model.safetensors").is_file():
        shutil.copyfile(adapter_dir / "adapter_model.safetensors", target / "adapter_model.safetensors")
        return
    from safetensors.torch import save_file

    # weights_only: a pickle can run code; a state dict of tensors does not need to
    state = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, target / "adapter_model.safetensors", metadata={"format": "pt"})


def _load_export_tokenizer(adapter_dir: Path, model_config: ModelConfig):
    """The tokenizer saved with the adapter, else the base model's."""
    if (adapter_dir / "tokenizer_config.json").is_file():
        return load_tokenizer(str(adapter_dir), model_config.trust_remote_code)
    base_path = resolve_model_path(model_config.model_name_or_path, model_config.cache_dir)
    return load_tokenizer(base_path, model_config.trust_remote_code)


def merge_adapter(model_config: ModelConfig, adapter_dir: str | Path, merge_dtype: str = "bf16"):
    """The base model, loaded unquantized in merge_dtype, with the adapter folded into its weights.

    Folding a LoRA delta into 4-bit weights would re-quantize it away (or fail), so a QLoRA model
    config is reloaded in merge_dtype. The merged model then differs from 4-bit base + adapter by
    the base's quantization error, as for any QLoRA merge.
    """
    from peft import PeftModel

    if model_config.precision in ("4bit", "8bit"):
        logger.warning(
            "model config says precision=%s: merging into the base reloaded unquantized in %s, not into %s weights",
            model_config.precision, merge_dtype, model_config.precision,
        )
    base, _ = load_base_model(dataclasses.replace(model_config, precision=merge_dtype, lora_r=0))
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def _write_merged(model_config: ModelConfig, adapter_dir: Path, target: Path, merge_dtype: str):
    merged = merge_adapter(model_config, adapter_dir, merge_dtype)
    merged.save_pretrained(target)  # transformers >= 5 writes safetensors only
    _load_export_tokenizer(adapter_dir, model_config).save_pretrained(target)
    config = json.loads((target / "config.json").read_text())
    if "quantization_config" in config:  # would make transformers load it as a quantized model
        raise RuntimeError(f"merged config.json carries a quantization_config: {config['quantization_config']}")
    weights = [p.name for p in target.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if weights:
        raise RuntimeError(f"merged model written with non-safetensors weights: {weights}")


def _check_written(directory: Path, token: str | None):
    """Refuse to keep or upload an export that contains the Hub token or pickled weights."""
    for path in directory.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix in (".bin", ".pt", ".pth", ".pkl"):
            raise RuntimeError(f"refusing to export {path.name}: weights are written as safetensors only")
        if token and token.encode() in _text_part(path):
            raise RuntimeError(f"refusing to export: {path.relative_to(directory)} contains the value of HF_TOKEN")


def _text_part(path: Path) -> bytes:
    """What of a file could hold a string: a safetensors file's JSON header, else the whole file."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        return handle.read(header_size)


def push(export_dir: Path, repo_id: str, private: bool, token: str) -> str:
    """Create the Hub repo (if needed) and upload export_dir to it. Returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(export_dir), commit_message="dftlite export")
    return str(url)


# ---------------------------------------------------------------------------------------------
# The model card.


def _base_kind(name: str) -> str:
    """'gguf' (a GGUF file or the embedded alias), 'hub' (a Hub id) or 'local' (a directory)."""
    try:
        gguf_file = resolve_model_source(name)[1]
    except (FileNotFoundError, ValueError):  # a GGUF file or alias not present on this machine
        return "gguf" if name.endswith(".gguf") else "local"
    if gguf_file is not None:
        return "gguf"
    return "hub" if not Path(name).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name) else "local"


def _rows(mapping: dict) -> str:
    return "\n".join(f"| `{key}` | `{value}` |" for key, value in mapping.items())


def _hyperparameters(training_config: dict | None, adapter_config: dict) -> dict:
    if training_config is None:  # at least the adapter's own settings
        keys = ("r", "lora_alpha", "lora_dropout", "target_modules")
        return {f"lora {k}": adapter_config[k] for k in keys if adapter_config.get(k) is not None}
    from transformers import TrainingArguments

    training_args = {f.name for f in dataclasses.fields(TrainingArguments)}
    method = training_config.get("method")
    return {
        key: value for key, value in sorted(training_config.items())
        if value is not None and key not in CARD_SKIP_KEYS and key not in CARD_DATA_KEYS
        and (key not in training_args or key in CARD_TRAINING_ARGS) and not key.endswith("_token")
        and (method is None or method in METHOD_ONLY_KEYS.get(key, (method,)))
    }


def _metrics_section(metrics: dict[str, dict]) -> str:
    if not metrics:
        return ("No evaluation metrics were found next to the adapter. "
                "Run `dftlite eval --adapter_path <adapter> --json_path <run dir>/eval.json` and export again.")
    parts = []
    for name, values in metrics.items():
        views = [v for v in ("base", "adapter") if isinstance(values.get(v), dict)]
        if views:  # dftlite eval's format
            keys = [k for k in ("accuracy", "win_rate", "gold_logp_per_token", "negative_logp_per_token", "mean_margin")
                    if any(isinstance(values[v].get(k), (int, float)) for v in views)]
            header = "| metric | " + " | ".join(views) + " |\n|---|" + "---:|" * len(views)
            lines = [f"| {k} | " + " | ".join(_number(values[v].get(k)) for v in views) + " |" for k in keys]
            where = f" on `{values['data_path']}` ({values.get('num_examples')} examples)" if values.get("data_path") else ""
            intro = f"From `{name}`{where}; base = the same model with the adapter switched off."
            parts.append(f"{intro}\n\n{header}\n" + "\n".join(lines))
        else:
            scalars = {k: _number(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            rows = "\n".join(f"| {k} | {v} |" for k, v in scalars.items())
            parts.append(f"From `{name}`:\n\n| metric | value |\n|---|---:|\n{rows}")
    return "\n\n".join(parts)


def _number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(model_config: ModelConfig, export_config: ExportConfig, adapter_config: dict,
               training_config: dict | None, metrics: dict[str, dict]) -> str:
    """README.md for the export: method, hyperparameters, data, metrics, how to load."""
    base_name = (training_config or {}).get("model_name_or_path") or model_config.model_name_or_path
    where = export_config.push_to_hub or str(export_config.export_dir)
    method = (training_config or {}).get("method")
    base_kind = _base_kind(base_name)
    front = ["---", "library_name: peft", *([f"base_model: {base_name}"] if base_kind == "hub" else []),
             "tags: [dftlite, discriminative-fine-tuning, dft, lora, peft]", "---"]

    if base_kind == "gguf":
        load_base = (f"from dftlite.models import resolve_model_path\n"
                     f"base = AutoModelForCausalLM.from_pretrained(resolve_model_path({base_name!r}))  # GGUF, dequantized once")
    else:
        load_base = f"base = AutoModelForCausalLM.from_pretrained({base_name!r})"
    adapter_snippet = (
        "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"{load_base}\nmodel = PeftModel.from_pretrained(base, {where!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({where!r})\n```"
    )
    if export_config.push_to_hub:
        merged_args = f"{where!r}, subfolder={MERGED_SUBDIR!r}"
    else:
        merged_args = repr(str(Path(where) / MERGED_SUBDIR))
    merged_snippet = (
        f"\n\nThe merged model (`{MERGED_SUBDIR}/`, {export_config.merge_dtype}) needs only transformers:\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"model = AutoModelForCausalLM.from_pretrained({merged_args})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({merged_args})\n```"
        if export_config.merge else ""
    )
    quantized_note = ""
    if export_config.merge and (training_config or {}).get("precision", model_config.precision) in ("4bit", "8bit"):
        quantized_note = ("\n\nThe adapter was trained on a quantized base (QLoRA); the merged weights fold it into the "
                          "unquantized base, which differs from quantized base + adapter by the quantization error.")
    data = {k: training_config[k] for k in CARD_DATA_KEYS if training_config and training_config.get(k) is not None}

    sections = [
        "\n".join(front),
        f"# {Path(where).name}: a LoRA adapter for `{base_name}` trained with dftlite",
        "## Method\n\n"
        f"Discriminative Fine-Tuning (DFT; Guo et al. 2025, *Discriminative Finetuning of Generative Large Language "
        f"Models without Reward Models and Human Preference Data*, [arXiv:2502.18679]({PAPER})). DFT raises the "
        "likelihood of each gold answer relative to negative answers sampled from the base model, so the model "
        "learns to tell good answers from its own typical ones, without a reward model or preference pairs. "
        "This is *not* Dynamic Fine-Tuning (TRL's `loss_type=\"dft\"`).\n\n"
        + (f"Objective: `{method}`: {METHOD_NOTES.get(method, 'see the training config.')}" if method
           else "Objective: not recorded (no training config found)."),
        "## Hyperparameters\n\n"
        + (f"From the training run's `{TRAINING_CONFIG}` (copied here in full).\n\n" if training_config
           else "No training config was found next to the adapter; these are the adapter's own settings.\n\n")
        + "| setting | value |\n|---|---|\n" + _rows(_hyperparameters(training_config, adapter_config)),
        "## Data\n\n" + ("| setting | value |\n|---|---|\n" + _rows(data) if data
                          else "Not recorded (no training config found)."),
        "## Metrics\n\n" + _metrics_section(metrics),
        "## How to load\n\nThe adapter (PEFT, safetensors):\n\n" + adapter_snippet + merged_snippet + quantized_note,
    ]
    return "\n\n".join(sections) + "\n"
