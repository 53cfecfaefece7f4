"""Model loading, LoRA/QLoRA attachment and the sampler view."""

from __future__ import annotations

import pytest
import torch

from dftlite.models import ModelConfig, load_base_model, load_model, resolve_model_source, sampler_view


def _train_a_few_steps(model, input_ids, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    before = [p.detach().clone() for p in params]
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, params)]
    return params, changed


@pytest.mark.parametrize("precision", ["fp32", "4bit"])
def test_sampler_view_is_the_base_model_after_training(tiny_model_dir, precision):
    config = ModelConfig(model_name_or_path=str(tiny_model_dir), precision=precision, lora_r=4, lora_dropout=0.1)
    model, tokenizer = load_model(config)
    reference, _ = load_base_model(config)  # the same base weights, no adapter at all
    reference.eval()
    input_ids = tokenizer(["Natalia sold 48 clips in April."], return_tensors="pt")["input_ids"]

    params, changed = _train_a_few_steps(model, input_ids)
    assert params and all(p.dtype == torch.float32 or precision == "4bit" for p in params)
    assert all(changed), "every LoRA parameter should move"
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    with torch.no_grad():
        adapted = model(input_ids=input_ids).logits
        with sampler_view(model):
            assert not model.training
            base = model(input_ids=input_ids).logits
        expected = reference(input_ids=input_ids).logits
    assert model.training, "sampler_view restores train mode"
    assert torch.equal(base, expected)  # bit for bit
    assert not torch.allclose(adapted, expected), "the trained adapter must change the logits"


def test_sampler_view_generate_matches_base(tiny_model_dir):
    config = ModelConfig(model_name_or_path=str(tiny_model_dir), precision="fp32", lora_r=4)
    model, tokenizer = load_model(config)
    reference, _ = load_base_model(config)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # make the adapter non-trivial without training
            torch.nn.init.normal_(param, std=1.0)
    input_ids = tokenizer(["How many clips"], return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad(), sampler_view(model):
        ours = model.generate(input_ids=input_ids, **kwargs)
    theirs = reference.generate(input_ids=input_ids, **kwargs)
    assert torch.equal(ours, theirs)


def test_hf_directory_loads_in_4bit_with_lora(tiny_model_dir):
    import bitsandbytes as bnb

    model, _ = load_model(ModelConfig(model_name_or_path=str(tiny_model_dir), precision="4bit", lora_r=8))
    base = model.get_base_model()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    assert model.peft_config["default"].r == 8
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in model.parameters())


def test_lora_target_modules_list(tiny_model_dir):
    model, _ = load_model(
        ModelConfig(model_name_or_path=str(tiny_model_dir), precision="fp32", lora_target_modules="q_proj, v_proj")
    )
    names = {n.split(".")[-4] for n, _ in model.named_parameters() if "lora_A" in n}
    assert names == {"q_proj", "v_proj"}


def test_bad_model_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model_source(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="precision"):
        ModelConfig(precision="3bit")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_model(ModelConfig(model_name_or_path=str(tmp_path), precision="fp32"), adapter_path=str(tmp_path))


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False


@pytest.mark.embedded
def test_embedded_gguf_loads_in_4bit_with_lora():
    import bitsandbytes as bnb

    directory, gguf_file = resolve_model_source("smollm2-135m-instruct")
    assert gguf_file.endswith(".gguf")
    model, tokenizer = load_model(ModelConfig())  # the defaults: embedded model, 4-bit NF4, LoRA r=16
    base = model.get_base_model()
    assert base.config.model_type == "llama" and base.config.vocab_size == 49152
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    assert any("lora_A" in n for n, _ in model.named_parameters())
    # A real instruct model: the chat template is there and greedy decoding says something sensible.
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad(), sampler_view(model):
        out = model.generate(input_ids=input_ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, input_ids.shape[1]:])


def test_4bit_gradients_are_right_after_a_sampler_view_forward(tiny_model_dir):
    """bitsandbytes may repack 4-bit weights for a CPU inference kernel without backward at the first
    eval-mode no-grad forward; training after sampling must still get the same gradients."""
    config = ModelConfig(model_name_or_path=str(tiny_model_dir), precision="4bit", lora_r=4)
    input_ids = torch.tensor([[5, 17, 42, 99, 7, 12]])

    def lora_grads(sample_first: bool):
        torch.manual_seed(0)
        model, _ = load_model(config)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.5)
        if sample_first:
            with torch.no_grad(), sampler_view(model):
                model(input_ids=input_ids)
        model.train()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh, after_sampling = lora_grads(False), lora_grads(True)
    assert fresh.keys() == after_sampling.keys()
    for name in fresh:
        torch.testing.assert_close(after_sampling[name], fresh[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("capability, native", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_is_decided_by_compute_capability(monkeypatch, capability, native):
    # A T4 (7.5) emulates bf16, and recent torch's is_bf16_supported() says True there: it must not decide.
    from dftlite import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert models.native_bf16() is native
    assert models.compute_torch_dtype("auto") == (torch.bfloat16 if native else torch.float16)
    assert models.compute_torch_dtype("fp32") == torch.float32  # an explicit choice is kept


def test_bf16_off_and_fp32_compute_without_a_gpu(monkeypatch):
    from dftlite import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.native_bf16() is False
    assert models.compute_torch_dtype("auto") == torch.float32


@pytest.mark.parametrize("precision, compute_dtype, expected", [
    ("fp32", "auto", "float32"), ("bf16", "fp32", "bfloat16"), ("fp16", "auto", "float16"),
    ("4bit", "auto", "float32"), ("4bit", "bf16", "bfloat16"), ("8bit", "fp16", "float16"),
])
def test_the_vllm_engine_loads_the_bases_weights_dtype(monkeypatch, precision, compute_dtype, expected):
    """A float base in its precision, a quantized one in its compute dtype ("auto": fp32 without a GPU), in
    both loaders: transformers' for training and vLLM's for sampling."""
    from dftlite import models
    from dftlite.engine_vllm import vllm_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = ModelConfig(precision=precision, compute_dtype=compute_dtype)
    assert models.weights_dtype(config) == getattr(torch, expected) and vllm_dtype(config) == expected
