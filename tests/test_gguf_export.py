"""GGUF export: a round trip through transformers' own GGUF loader (`gguf_file=`) against the merged
model, the Ollama Modelfile, and refusals of architectures the writer does not support."""

from __future__ import annotations

import pytest
import torch
from test_export import run_export

from dftlite.models import ModelConfig, load_model

PROMPTS = ["Natalia sold 48 clips in April.", "How many clips did Natalia sell?", "Weng earns $12 an hour."]


@pytest.fixture(scope="module")
def model_config(tiny_model_dir):
    return ModelConfig(model_name_or_path=str(tiny_model_dir), precision="fp32", lora_r=4)


@pytest.fixture(scope="module")
def exported(model_config, tmp_path_factory):
    """One export with merged fp32 weights, for each GGUF type; "run": the training run they come from."""
    import gguf  # noqa: F401  (the writer's package; a dev dependency)

    run = tmp_path_factory.mktemp("run")
    model, _ = load_model(model_config)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained-size update: lora_B starts at 0, training moves it by about this much
            torch.nn.init.normal_(param, std=0.05)
    model.save_pretrained(run / "adapter")
    exports = {kind: run_export(model_config, run, tmp_path_factory.mktemp(kind) / "tiny-dft2", merge=True,
                                merge_dtype="fp32", gguf=kind) for kind in ("f16", "q8_0")}
    return {**exports, "run": run}


def _load_pair(out, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(str(out / "gguf"), gguf_file=f"tiny-dft2-{kind}.gguf").eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(out / "gguf"), gguf_file=f"tiny-dft2-{kind}.gguf")
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(str(out / "merged"))
    return gguf_model, gguf_tokenizer, merged, merged_tokenizer


def _inputs(tokenizer, prompt):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def test_f16_round_trip_logits(exported):
    gguf_model, gguf_tokenizer, merged, tokenizer = _load_pair(exported["f16"], "f16")
    assert gguf_tokenizer.chat_template == tokenizer.chat_template  # the template travels in the metadata
    for prompt in PROMPTS:
        input_ids = _inputs(tokenizer, prompt)
        assert _inputs(gguf_tokenizer, prompt).tolist() == input_ids.tolist()  # same tokens from the GGUF's vocab
        with torch.no_grad():
            ours, theirs = gguf_model(input_ids).logits, merged(input_ids).logits
        scale = theirs.abs().max().item()
        # f16 weights: about 3 significant digits per weight; a q/k permutation error would be O(scale)
        assert (ours - theirs).abs().max().item() < 0.02 * scale


def test_q8_0_round_trip_same_greedy_tokens(exported):
    gguf_model, _, merged, tokenizer = _load_pair(exported["q8_0"], "q8_0")
    for prompt in PROMPTS:
        input_ids = _inputs(tokenizer, prompt)
        kwargs = dict(do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            assert gguf_model.generate(input_ids=input_ids, **kwargs).tolist() == merged.generate(
                input_ids=input_ids, **kwargs).tolist()


def test_modelfile_and_card(exported):
    out = exported["q8_0"]
    modelfile = (out / "gguf" / "Modelfile").read_text()
    assert "FROM ./tiny-dft2-q8_0.gguf" in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    card = (out / "README.md").read_text()
    assert "gguf/tiny-dft2-q8_0.gguf" in card and "ollama create" in card


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config

    from dftlite.config import ConfigError
    from dftlite.gguf_export import check_supported

    with pytest.raises(ConfigError, match="model_type 'gpt2'.*convert_hf_to_gguf"):
        check_supported(GPT2Config())


def test_mistral_with_sentencepiece_style_tokenizer(tmp_path):
    """Mistral-7B's layout: model_type mistral, untied output, a SentencePiece-style BPE (byte fallback, ▁)."""
    from conftest import SAMPLE_TEXT
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    from dftlite.gguf_export import write_gguf

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    spm = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    spm.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    spm.train_from_iterator(SAMPLE_TEXT * 20, trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    # not "mistral…": transformers then reads the file as model_type mistral, which its loader lacks with gguf 0.19
    write_gguf(model, tokenizer, tmp_path, "tiny-m", "f16", "mistralai/Mistral-7B-v0.1")

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny-m-f16.gguf").eval()
    ids = tokenizer("Natalia sold clips in April", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours, theirs = loaded(ids).logits, model(ids).logits
    assert (ours - theirs).abs().max().item() < 0.02 * theirs.abs().max().item()
    read_back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny-m-f16.gguf")
    assert read_back("Natalia sold clips in April")["input_ids"] == ids[0].tolist()  # no BOS, as the HF tokenizer
    assert '[INST] {{ .Content }} [/INST]' in (tmp_path / "Modelfile").read_text()


def test_gguf_with_a_bf16_merge_rounds_the_fp32_merge_once(model_config, exported, tmp_path):
    """--gguf merges in fp32 (the GGUF rounds the exact merge); merged/ is still written in merge_dtype."""
    from gguf import GGUFReader
    from safetensors import safe_open

    out = run_export(model_config, exported["run"], tmp_path / "tiny-dft2", merge=True, merge_dtype="bf16", gguf="f16")
    with safe_open(str(out / "merged" / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(name).dtype for name in handle.keys()} == {torch.bfloat16}
    ours = {t.name: t.data.copy() for t in GGUFReader(str(out / "gguf" / "tiny-dft2-f16.gguf")).tensors}
    reference = {t.name: t.data for t in GGUFReader(str(exported["f16"] / "gguf" / "tiny-dft2-f16.gguf")).tensors}
    assert ours.keys() == reference.keys() and all((ours[n] == reference[n]).all() for n in ours)
