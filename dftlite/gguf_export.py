"""The merged model as a GGUF file for llama.cpp and Ollama, plus an Ollama Modelfile.

    from dftlite.gguf_export import write_gguf
    files = write_gguf(merged_model, tokenizer, Path("out/gguf"), "demo-dft2", "q8_0")
    # -> out/gguf/demo-dft2-q8_0.gguf, out/gguf/Modelfile

Written with the `gguf` package's writer (llama.cpp's own Python package, which dftlite already
needs for its embedded model): its tensor-name map, vocabulary readers (`BpeVocab` for GPT-2-style
byte-level BPE, `LlamaHfVocab` for SentencePiece-style BPE with byte fallback), `SpecialVocab`
(merges, special token ids, chat template) and Q8_0 quantiser. llama.cpp's converter
(`convert_hf_to_gguf.py`) is not on PyPI, so there is nothing more complete to depend on; what it
does for Llama is small and copied here: the q/k permutation below and the tensor types.

Llama-family models only (model_type llama or mistral, no attention/MLP bias, no RoPE scaling):
SmolLM2, Llama 1/2/3.0 and Mistral-7B. Others are refused with a message. Not here: merging
(export.merge_adapter) and reading GGUF (transformers' `gguf_file=` loader, models.convert_gguf).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from dftlite.config import ConfigError

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# llama.cpp picks its pre-tokenizer regex by name; "default" is GPT-2's. Known bases by Hub id prefix.
PRE_TOKENIZERS = {"HuggingFaceTB/SmolLM": "smollm", "meta-llama/Meta-Llama-3": "llama-bpe", "meta-llama/Llama-3": "llama-bpe"}
GGUF_SUFFIX = ".gguf"


def check_supported(config) -> None:
    """Refuse configurations the Llama GGUF layout cannot express; the message names the fix."""
    problem = None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        problem = f"model_type {config.model_type!r} (GGUF export supports {', '.join(SUPPORTED_MODEL_TYPES)})"
    elif getattr(config, "rope_scaling", None) and (config.rope_scaling.get("rope_type") or
                                                     config.rope_scaling.get("type")) not in (None, "default"):
        problem = f"RoPE scaling {config.rope_scaling}"
    elif getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problem = "attention or MLP biases"
    if problem is not None:
        raise ConfigError(f"--gguf: this model has {problem}, which dftlite's GGUF writer does not support; "
                          "export with --merge and convert merged/ with llama.cpp's convert_hf_to_gguf.py")


def _permute_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF Llama rotates halves of each head (rotate_half); GGUF's llama rotates adjacent pairs.
    Reorder q/k rows per head from [x0..x_{d/2-1}, y0..] to [x0, y0, x1, y1, ...] (llama.cpp's permute)."""
    rows = weight.shape[0]  # (num_heads * head_dim, hidden)
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _vocab(tokenizer_dir: Path):
    import gguf

    # As llama.cpp's converter tries them: SentencePiece's own model file (needs the sentencepiece
    # package), GPT-2-style byte-level BPE, then SentencePiece-style BPE from tokenizer.json.
    classes = (gguf.SentencePieceVocab,) if (tokenizer_dir / "tokenizer.model").is_file() else ()
    for vocab_class in (*classes, gguf.BpeVocab, gguf.LlamaHfVocab):
        try:
            return vocab_class(tokenizer_dir)
        except (FileNotFoundError, TypeError, RuntimeError):  # RuntimeError: sentencepiece not installed
            continue
    raise ConfigError("--gguf: the tokenizer is neither GPT-2-style byte-level BPE nor SentencePiece-style BPE "
                      "(tokenizer.json); export with --merge and convert merged/ with llama.cpp's convert_hf_to_gguf.py")


def _add_tokenizer(writer, tokenizer, vocab_size: int, pre: str) -> None:
    """Tokens, types, scores, merges, special ids and the chat template into the GGUF metadata."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        vocab = _vocab(Path(tmp))
        tokens, scores, types = [], [], []
        for text, score, token_type in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(token_type)
        # Special tokens inside the base vocabulary (SmolLM2's <|im_end|>, ...) are control tokens:
        # llama.cpp renders them and stops on them only when typed so.
        special_ids = set(tokenizer.all_special_ids) | {
            token_id for token_id, added in tokenizer.added_tokens_decoder.items() if added.special}
        for token_id in special_ids:
            if token_id < len(types):
                types[token_id] = gguf.TokenType.CONTROL
        for index in range(len(tokens), vocab_size):  # the embedding has padding rows beyond the tokenizer
            tokens.append(f"[PAD{index}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2":
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(Path(tmp), load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
        if "bos" not in special.add_special_token:
            # Absent, llama.cpp prepends BOS to GPT-2-style vocabularies; the chat templates carry their own
            # specials, so say what the HF tokenizer does (SmolLM2: no BOS), as llama.cpp's converter does.
            probe = tokenizer("a")["input_ids"]
            special.add_special_token["bos"] = bool(probe) and probe[0] == tokenizer.bos_token_id
        special.add_to_gguf(writer, quiet=True)
        if tokenizer.pad_token_id is not None and special.special_token_ids.get("pad") is None:
            writer.add_pad_token_id(tokenizer.pad_token_id)


def write_gguf(model, tokenizer, target_dir: Path, name: str, gguf_type: str, base_id: str = "",
               license_: str | None = None) -> list[Path]:
    """Write `<name>-<gguf_type>.gguf` (the model's weights; f16 or q8_0) and an Ollama `Modelfile`.

    `model` is a plain (merged) transformers Llama-family model; `base_id` (the base's Hub id) is
    recorded as general.base_model and picks llama.cpp's pre-tokenizer for known bases. Returns the written paths.
    """
    import gguf

    config = model.config
    check_supported(config)
    num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    target_dir.mkdir(parents=True, exist_ok=True)
    path = target_dir / f"{name}-{gguf_type}{GGUF_SUFFIX}"

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type("model")
    writer.add_name(name)
    if base_id:
        writer.add_base_model_count(1)
        writer.add_base_model_organization(0, base_id.split("/")[0])
        writer.add_base_model_name(0, base_id.split("/")[-1])
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_id}")
    if license_:
        writer.add_license(license_)
    writer.add_tags(["dft", "discriminative-fine-tuning", "dftlite"])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // num_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or
                                    (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pre = next((p for prefix, p in PRE_TOKENIZERS.items() if base_id.startswith(prefix)), "default")
    _add_tokenizer(writer, tokenizer, config.vocab_size, pre)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    from rich.progress import track

    for hf_name, tensor in track(state.items(), description=f"GGUF {gguf_type}", total=len(state), transient=True):
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd for the output when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"--gguf: no GGUF name for tensor {hf_name!r}; this model is not a plain Llama")
        weight = tensor.detach().to(torch.float32).cpu()
        if hf_name.endswith("q_proj.weight"):
            weight = _permute_rope(weight, num_heads)
        elif hf_name.endswith("k_proj.weight"):
            weight = _permute_rope(weight, num_kv_heads)
        data = weight.numpy()
        if data.ndim == 1:  # norms stay f32, as llama.cpp's converter keeps them
            writer.add_tensor(gguf_name, data)
        elif gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:  # f16, or a q8_0 row length that is not a multiple of the 32-value block
            writer.add_tensor(gguf_name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()

    modelfile = target_dir / "Modelfile"
    modelfile.write_text(ollama_modelfile(path.name, tokenizer))
    logger.info("wrote %s (%s) and %s", path, gguf_type, modelfile)
    return [path, modelfile]


# Go templates (Ollama's TEMPLATE syntax) for the chat formats dftlite's recipes use. Ollama does not
# run Jinja; for other templates it reads tokenizer.chat_template from the GGUF and matches known ones.
OLLAMA_TEMPLATES = {
    "<|im_start|>": (  # ChatML: SmolLM2, Qwen, the tests' tiny model
        '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n',
        ["<|im_start|>", "<|im_end|>"],
    ),
    "<|start_header_id|>": (  # Llama 3
        '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
        '{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n',
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    "[INST]": (  # Mistral / Llama 2 instruct
        '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]{{ else if eq .Role "assistant" }}'
        ' {{ .Content }}</s>{{ end }}{{ end }}',
        ["[INST]", "[/INST]"],
    ),
}


def ollama_modelfile(gguf_name: str, tokenizer) -> str:
    """`ollama create <name> -f Modelfile` in the gguf/ folder: the file, its chat template, stop tokens."""
    chat_template = getattr(tokenizer, "chat_template", None) or ""
    template, stops = next(((t, s) for marker, (t, s) in OLLAMA_TEMPLATES.items() if marker in chat_template),
                           (None, []))
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops = [*stops, tokenizer.eos_token]
    lines = ["# Ollama: ollama create <name> -f Modelfile   (run in this folder), then: ollama run <name>",
             f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: Ollama reads the chat template from the GGUF metadata (tokenizer.chat_template)")
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


def gguf_metadata_bytes(path: Path) -> bytes:
    """The part of a GGUF file that can hold strings (header and metadata, before the tensor data)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    with open(path, "rb") as handle:
        return handle.read(reader.data_offset)
