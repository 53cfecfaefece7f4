"""Export a trained adapter: PEFT adapter (safetensors), optionally a merged model, a model card, the Hub.

    dftlite export --adapter_path runs/demo/run/adapter --export_dir out/demo
    dftlite export --adapter_path runs/demo/run/adapter --export_dir out/demo --merge --merge_dtype bf16
    dftlite export --adapter_path runs/demo/run/adapter --export_dir out/demo --gguf q8_0     # + llama.cpp / Ollama
    HF_TOKEN=hf_... dftlite export --adapter_path runs/demo/run/adapter --export_dir out/demo --push_to_hub me/demo-dft2

Layout of export_dir (weights are safetensors only, everywhere):
    adapter_config.json, adapter_model.safetensors   the LoRA adapter; base_model_name_or_path is the base's
                          Hub id, so AutoPeftModelForCausalLM.from_pretrained(export_dir or repo) loads it
    tokenizer files
    dftlite_config.yaml   the training run's resolved config, when found next to the adapter or one level up
    export_config.yaml    this export's resolved config
    eval.json, ...        metrics files found next to the adapter or in the run directory
    training_curves.png   the run's curves, when found; shown in the card
    README.md             model card (model_card.py): Hub metadata, method, data, hyperparameters, metrics, usage
    merged/               with merge=True: a plain transformers model (adapter folded into the weights), with
                          its own card. A subfolder because transformers loads a folder holding
                          adapter_config.json as an adapter, not as the merged weights.
    gguf/                 with gguf=f16|q8_0: <name>-<type>.gguf (the merged model) and an Ollama Modelfile

Nothing in an export names a path of this machine: the base is recorded by Hub id (see
model_card.resolve_base_id; --base_model_id for a local directory), copied configs and metrics have
absolute paths replaced by `<local path>/<name>`, and the export is checked for such paths before it is kept.

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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml

from dftlite.config import ConfigError, save_resolved_config
from dftlite.model_card import base_license, model_card, resolve_base_id, scrub_paths
from dftlite.models import ModelConfig, load_base_model, load_tokenizer, resolve_model_path
from dftlite.outputs import disk_full_guard, output_lock, staged_directory

logger = logging.getLogger(__name__)

TRAINING_CONFIG = "dftlite_config.yaml"
EXPORT_CONFIG = "export_config.yaml"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
METRIC_FILES = ("eval.json", "metrics.json", "all_results.json", "train_results.json", "eval_results.json")
MERGED_SUBDIR = "merged"
GGUF_SUBDIR = "gguf"
GGUF_TYPES = ("f16", "q8_0")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CURVES = "training_curves.png"


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
    base_model_id: str | None = field(
        default=None,
        metadata={"help": "Hub id (org/name) of the base model, recorded in adapter_config.json and the card. "
                  "Needed only for a local base directory or GGUF file that is not the embedded model "
                  "or a Hub cache snapshot: an export never records a path of this machine."},
    )
    gguf: str | None = field(
        default=None,
        metadata={"help": "Also write the merged model as GGUF for llama.cpp/Ollama: f16 or q8_0 "
                  "(gguf/<name>-<type>.gguf plus an Ollama Modelfile). Llama-family models only."},
    )

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
        self.base_model_id = self.base_model_id or None
        self.gguf = self.gguf or None
        if self.gguf is not None and self.gguf not in GGUF_TYPES:
            raise ValueError(f"gguf must be one of {GGUF_TYPES}, got {self.gguf!r}")


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

    base_name = (training_config or {}).get("model_name_or_path") or model_config.model_name_or_path
    base_id = resolve_base_id(base_name, export_config.base_model_id)  # before any work: it may ask for --base_model_id

    with output_lock(export_dir, "export_dir"):  # one export into export_dir at a time, through the upload
        _check_inputs(adapter_dir, export_dir, export_config)  # again, now that no other export can write it
        with disk_full_guard(export_dir, "the export"), staged_directory(export_dir) as tmp:  # whole, or nothing
            _copy_adapter(adapter_dir, tmp, base_id)
            _load_export_tokenizer(adapter_dir, model_config).save_pretrained(tmp)
            if training_config_path is not None:  # local paths become <local path>/<name>
                (tmp / TRAINING_CONFIG).write_text(yaml.safe_dump(scrub_paths(training_config), sort_keys=True))
            save_resolved_config(tmp, model_config, export_config, name=EXPORT_CONFIG)
            exported = yaml.safe_load((tmp / EXPORT_CONFIG).read_text())
            (tmp / EXPORT_CONFIG).write_text(yaml.safe_dump(scrub_paths(exported), sort_keys=True))
            metrics = {}
            for name in METRIC_FILES:
                path = _find(adapter_dir, [name])
                if path is not None:
                    metrics[name] = scrub_paths(json.loads(path.read_text()))
                    (tmp / name).write_text(json.dumps(metrics[name], indent=2) + "\n")
            curves = _find(adapter_dir, [CURVES])
            if curves is not None:
                shutil.copyfile(curves, tmp / CURVES)
            gguf_files, license_ = [], base_license(base_name, base_id)
            if export_config.merge or export_config.gguf:
                # GGUF: merge in fp32, so that f16/q8_0 round the exact merge once (not a bf16 copy of it again)
                merge_dtype = "fp32" if export_config.gguf else export_config.merge_dtype
                merged = merge_adapter(model_config, adapter_dir, merge_dtype)
                tokenizer = _load_export_tokenizer(adapter_dir, model_config)
                if export_config.gguf:
                    from dftlite.gguf_export import write_gguf

                    written = write_gguf(merged, tokenizer, tmp / GGUF_SUBDIR, export_dir.name, export_config.gguf,
                                         base_id, license_)
                    gguf_files = [str(path.relative_to(tmp)) for path in written]
                if export_config.merge:
                    _write_merged(merged.to(DTYPES[export_config.merge_dtype]), tokenizer, tmp / MERGED_SUBDIR)
            card = dict(base_name=base_name, base_id=base_id, license_=license_,
                        adapter_config=json.loads((tmp / "adapter_config.json").read_text()),
                        training_config=scrub_paths(training_config), metrics=metrics,
                        merge_dtype=export_config.merge_dtype if export_config.merge else None)
            repo = export_config.push_to_hub or f"<user>/{export_dir.name}"
            (tmp / "README.md").write_text(model_card(relation="adapter", repo=repo, curves=CURVES if curves else None,
                                                      gguf_files=gguf_files, **card))
            if export_config.merge:
                (tmp / MERGED_SUBDIR / "README.md").write_text(model_card(
                    relation="finetune", repo=repo, **card))
            _check_written(tmp, token, _machine_paths(adapter_dir, export_dir, base_name, model_config))
        console = Console()
        merged = f" (merged, {export_config.merge_dtype}, in {export_dir / MERGED_SUBDIR})" if export_config.merge else ""
        console.print(f"exported {adapter_dir} to {export_dir}{merged}")
        if export_config.gguf:
            console.print(f"GGUF ({export_config.gguf}) and Ollama Modelfile in {export_dir / GGUF_SUBDIR}")
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


def _copy_adapter(adapter_dir: Path, target: Path, base_id: str):
    """adapter_config.json with the base's Hub id + adapter_model.safetensors byte for byte (a legacy .bin is converted).

    PEFT records the path the base was loaded from (for a GGUF base, dftlite's dequantised cache);
    `AutoPeftModelForCausalLM` and the Hub read this field, so it must be the Hub id."""
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = base_id
    (target / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
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


def _write_merged(merged, tokenizer, target: Path):
    merged.save_pretrained(target)  # transformers >= 5 writes safetensors only
    tokenizer.save_pretrained(target)
    config = json.loads((target / "config.json").read_text())
    if "quantization_config" in config:  # would make transformers load it as a quantized model
        raise RuntimeError(f"merged config.json carries a quantization_config: {config['quantization_config']}")
    weights = [p.name for p in target.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if weights:
        raise RuntimeError(f"merged model written with non-safetensors weights: {weights}")


def _machine_paths(adapter_dir: Path, export_dir: Path, base_name: str, model_config: ModelConfig) -> list[str]:
    """Absolute paths of this machine that an export must not contain (the card and configs name no paths)."""
    from dftlite.models import default_cache_dir

    paths = {adapter_dir.resolve(), export_dir.resolve().parent, Path.home(), Path.cwd(), default_cache_dir().resolve(),
             Path(tempfile.gettempdir()).resolve()}
    if model_config.cache_dir:
        paths.add(Path(model_config.cache_dir).resolve())
    if Path(base_name).exists():
        paths.add(Path(base_name).resolve())
    return sorted({str(p) for p in paths if len(p.parts) > 1})  # "/" itself is in every path


def _check_written(directory: Path, token: str | None, machine_paths: list[str] = ()):
    """Refuse to keep or upload an export that contains the Hub token, pickled weights or a path of this machine."""
    for path in directory.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix in (".bin", ".pt", ".pth", ".pkl"):
            raise RuntimeError(f"refusing to export {path.name}: weights are written as safetensors only")
        text = _text_part(path)
        if token and token.encode() in text:
            raise RuntimeError(f"refusing to export: {path.relative_to(directory)} contains the value of HF_TOKEN")
        leaked = next((p for p in machine_paths if p.encode() in text), None)
        if leaked is not None:
            raise RuntimeError(f"refusing to export: {path.relative_to(directory)} contains the local path {leaked}; "
                               "an export must load on other machines (please report this as a dftlite bug)")


def _text_part(path: Path) -> bytes:
    """What of a file could hold a string: a safetensors file's JSON header, a GGUF file's metadata, else the file."""
    if path.suffix == ".gguf":
        from dftlite.gguf_export import gguf_metadata_bytes

        return gguf_metadata_bytes(path)
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
