"""The trainer end to end on the tiny random Llama, on CPU in fp32: effect, resume, draws, errors.

Pools come from `sample_pool` on the same tiny model, so the pool format cannot drift from the sampler's.
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, write_jsonl
from dftlite.config import parse_args
from dftlite.data import DataConfig
from dftlite.draws import pad_groups
from dftlite.logprobs import sequence_logprobs
from dftlite.models import ModelConfig, load_model
from dftlite.sampling import SampleConfig, sample_pool
from dftlite.trainer import DFTConfig, DFTTrainer, NonFiniteLossError, build_trainer, train

TRAIN_PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]
EVAL_PAIRS = [(2, 3), (5, 1), (7, 2), (9, 9)]


def _rows(pairs):
    return [{"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}"} for a, b in pairs]


@pytest.fixture(scope="module")
def workspace(tiny_model_dir, tmp_path_factory):
    """Training data (8 pairs) with a pool of 8 negatives each (with logp_train_prompt), and
    held-out data (4 pairs) with a pool of 4 negatives each (without)."""
    root = tmp_path_factory.mktemp("trainer")
    train_path = write_jsonl(root / "train.jsonl", _rows(TRAIN_PAIRS))
    eval_path = write_jsonl(root / "eval.jsonl", _rows(EVAL_PAIRS))
    model_config = _model_config(tiny_model_dir)
    model, tokenizer = load_model(model_config)
    train_pool = SampleConfig(pool_dir=str(root / "pool"), num_negatives=8, max_new_tokens=10, score_train_prompt=True)
    sample_pool(model_config, DataConfig(data_path=str(train_path)), train_pool, model, tokenizer)
    eval_pool = SampleConfig(pool_dir=str(root / "eval_pool"), num_negatives=4, max_new_tokens=10)
    sample_pool(model_config, DataConfig(data_path=str(eval_path)), eval_pool, model, tokenizer)
    return {"root": root, "model_dir": tiny_model_dir, "train": str(train_path), "eval": str(eval_path),
            "pool": str(root / "pool"), "eval_pool": str(root / "eval_pool")}


def _model_config(model_dir, **overrides):
    return ModelConfig(model_name_or_path=str(model_dir), precision="fp32", lora_r=8, **overrides)


def _config(ws, output_dir, **overrides) -> DFTConfig:
    settings = dict(output_dir=str(output_dir), use_cpu=True, pool_dir=ws["pool"], learning_rate=1e-2, seed=0,
                    save_strategy="no", disable_tqdm=True, log_level="error")  # fp32 CPU, like every test here
    return DFTConfig(**{**settings, **overrides})


def _data(ws, path=None):
    return DataConfig(data_path=path or ws["train"])


def _step_logs(history):
    return [entry for entry in history if "loss" in entry]


def test_dft2_pushes_held_out_negatives_down_more_than_sft(workspace, tmp_path):
    ws, model_config = workspace, _model_config(workspace["model_dir"])
    common = dict(eval_data_path=ws["eval"], eval_pool_dir=ws["eval_pool"], num_train_epochs=4, allow_negative_reuse=True,
                  eval_strategy="epoch", eval_on_start=True)
    sft = train(model_config, _data(ws), _config(ws, tmp_path / "sft", method="sft", **common))

    model, tokenizer = load_model(model_config)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    dft2 = train(model_config, _data(ws), _config(ws, tmp_path / "dft2", u_init="first_batch", **common), model, tokenizer)

    history = [json.loads(line) for line in open(tmp_path / "dft2" / "log_history.jsonl")]
    base = next(e for e in history if "eval_loss" in e and e["step"] == 0)
    # negatives (held out, from the base model) lose more likelihood than under SFT; positives gain
    assert dft2.metrics["eval_neg_logp_per_token"] < sft.metrics["eval_neg_logp_per_token"] - 0.03
    assert dft2.metrics["eval_pos_logp_per_token"] > base["eval_pos_logp_per_token"] + 0.1

    changed = [name for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[name])]
    assert before and sorted(changed) == sorted(before), "every trainable LoRA parameter must change"
    steps = _step_logs(history)
    assert len(steps) == 8
    for key in ("loss", "sft_part", "neg_part", "pos_logp_per_token", "neg_logp_per_token", "log_u_mean",
                "weight_mean", "weight_max", "weight_entropy", "grad_norm", "tokens_per_second"):
        assert all(math.isfinite(entry[key]) for entry in steps), key
    out = tmp_path / "dft2"
    for name in ("adapter/adapter_model.safetensors", "adapter/tokenizer_config.json", "dft_state.safetensors",
                 "dft_state.json", "dftlite_config.yaml", "training_curves.png"):
        assert (out / name).is_file(), name
    assert not (out / "adapter" / "README.md").exists()  # PEFT's card names a local base path; export writes ours
    state = load_file(str(out / "dft_state.safetensors"))
    assert torch.equal(state["visits"], torch.full((8,), 4)) and torch.isfinite(state["log_u"]).all()
    reloaded, _ = load_model(model_config, adapter_path=dft2.adapter_path)
    trained, saved = dict(model.named_parameters()), dict(reloaded.named_parameters())
    assert all(torch.equal(trained[name].detach(), saved[name].detach()) for name in before)


def test_resume_after_interrupt_is_exact(workspace, tmp_path, monkeypatch):
    """Ctrl-C at step 6 (mid epoch 2) saves checkpoint-6; resuming reproduces the uninterrupted run."""
    ws, model_config = workspace, _model_config(workspace["model_dir"])
    settings = dict(per_device_train_batch_size=2, u_init="first_batch")  # 4 steps per epoch
    train(model_config, _data(ws), _config(ws, tmp_path / "full", **settings))

    original_step = DFTTrainer.training_step

    def step_then_interrupt(self, model, inputs, num_items_in_batch=None):
        loss = original_step(self, model, inputs, num_items_in_batch)
        if self.state.global_step == 5:  # during step 6
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    with monkeypatch.context() as patch:
        patch.setattr(DFTTrainer, "training_step", step_then_interrupt)
        with pytest.raises(SystemExit) as exit_info:
            train(model_config, _data(ws), _config(ws, tmp_path / "resumed", **settings))
    assert exit_info.value.code == 130
    checkpoints = sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-6"]
    assert json.loads((tmp_path / "resumed" / "checkpoint-6" / "dft_state.json").read_text())["num_examples"] == 8
    draws = load_file(str(tmp_path / "resumed" / "checkpoint-6" / "dft_state.safetensors"))["draws_taken"]
    assert sorted(draws.tolist()) == [1, 1, 1, 1, 2, 2, 2, 2]  # mid epoch: half the examples drawn twice

    checkpoint = str(tmp_path / "resumed" / "checkpoint-6")
    train(model_config, _data(ws), _config(ws, tmp_path / "resumed", resume_from_checkpoint=checkpoint, **settings))
    history_full = _step_logs(json.loads(line) for line in open(tmp_path / "full" / "log_history.jsonl"))
    history_resumed = _step_logs(json.loads(line) for line in open(tmp_path / "resumed" / "log_history.jsonl"))
    assert [e["step"] for e in history_resumed] == list(range(1, 9))
    for key in ("loss", "grad_norm", "log_u_mean", "neg_logp_per_token"):
        assert [e[key] for e in history_resumed] == [e[key] for e in history_full], key
    for name in ("dft_state.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "resumed" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_each_epoch_draws_fresh_negatives(workspace, tmp_path):
    ws = workspace
    trainer = build_trainer(_model_config(ws["model_dir"]), _data(ws), _config(ws, tmp_path, max_steps=4))
    drawn = {}
    positions = trainer.draws.positions

    def recording(index, draw=None):
        chosen = positions(index, draw)
        drawn.setdefault(index, []).append(chosen)
        return chosen

    trainer.draws.positions = recording
    trainer.train()
    assert trainer.draws.draws_taken.tolist() == [2] * 8
    for index, draws in drawn.items():
        assert len(draws) == 2 and len(set(draws[0]) | set(draws[1])) == 4, "two epochs, 2 + 2 distinct negatives"
        assert draws[0] + draws[1] == trainer.draws.permutation(index)[:4]


def test_non_finite_loss_stops_before_saving(workspace, tmp_path):
    from transformers import TrainerCallback

    class PoisonAdapter(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    ws = workspace
    config = _config(ws, tmp_path, save_strategy="steps", save_steps=1)
    trainer = build_trainer(_model_config(ws["model_dir"]), _data(ws), config, callbacks=[PoisonAdapter()])
    with pytest.raises(NonFiniteLossError, match=r"step 3: non-finite positive log-probs.*checkpoint-2"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_evaluation_leaves_u_and_draws_alone(workspace, tmp_path):
    ws = workspace
    config = _config(ws, tmp_path, max_steps=1, eval_data_path=ws["eval"], eval_pool_dir=ws["eval_pool"])
    trainer = build_trainer(_model_config(ws["model_dir"]), _data(ws), config)
    trainer.train()
    log_u, visits, draws = trainer.log_u.log_u.clone(), trainer.log_u.visits.clone(), trainer.draws.draws_taken.clone()
    metrics = trainer.evaluate()
    assert torch.equal(trainer.log_u.log_u, log_u) and torch.equal(trainer.log_u.visits, visits)
    assert torch.equal(trainer.draws.draws_taken, draws)
    for key in ("eval_loss", "eval_pos_logp_per_token", "eval_neg_logp_per_token", "eval_log_u_mean"):
        assert math.isfinite(metrics[key]), key


@pytest.mark.parametrize("method, extra", [("sft", {}), ("simpo", {}), ("simpo_sft", {}), ("dpo", {}),
                                           ("dft", {"reference": "train_prompt"})])
def test_every_method_trains(workspace, tmp_path, method, extra):
    ws = workspace
    config = _config(ws, tmp_path, method=method, max_steps=2, **extra)
    trainer = build_trainer(_model_config(ws["model_dir"]), _data(ws), config)
    trainer.train()
    steps = _step_logs(trainer.state.log_history)
    assert len(steps) == 2 and all(math.isfinite(e["loss"]) and math.isfinite(e["pos_logp_per_token"]) for e in steps)


def test_micro_batches_and_accumulation_give_the_same_step(workspace, tmp_path):
    """token_budget and gradient accumulation only change how a step is cut, not its loss or update."""
    ws, histories, adapters = workspace, [], []
    model_config = _model_config(ws["model_dir"], lora_dropout=0.0)  # dropout masks would depend on the cut
    cuts = [dict(), dict(token_budget=60), dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)]
    # SGD: its update is linear in the gradient. Adam's m/sqrt(v) blows float rounding in near-zero gradient
    # entries up to ~1e-5 once both steps have a learning rate above 0 (no warmup in a 2-step run).
    for number, cut in enumerate(cuts):
        # sft_weight 0: a token-level term (λ·NLL, or method sft) is normalised over each accumulation
        # micro-step's gold tokens, not the optimizer step's, so accumulation changes it slightly (3e-5 here)
        trainer = build_trainer(model_config, _data(ws), _config(ws, tmp_path / str(number), max_steps=2, optim="sgd",
                                                                sft_weight=0.0, **cut))
        trainer.train()
        histories.append([e["loss"] for e in _step_logs(trainer.state.log_history)])
        adapters.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    for history, adapter in zip(histories[1:], adapters[1:]):
        assert history == pytest.approx(histories[0], rel=1e-5)
        assert all(torch.allclose(adapter[n], adapters[0][n], atol=1e-6) for n in adapter)


def test_shipped_train_config_parses():
    path = REPO / "configs" / "smollm2-135m_gsm8k_dft2_cpu.yaml"
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#") and "dftlite sample --config" in first_line and "dftlite train --config" in first_line
    from dftlite.cli import _recipe_types

    model_config, data_config, dft_config = parse_args([ModelConfig, DataConfig, DFTConfig], ["--config", str(path)],
                                                       shared_types=_recipe_types())
    assert dft_config.method == "dft2" and dft_config.pool_dir and (REPO / data_config.data_path).is_file()


def _one_step_gradients(ws, output_dir, **overrides) -> dict[str, torch.Tensor]:
    """LoRA gradients of one DFT2 step on 4 prompts, with non-zero LoRA B and confident logits (scaled
    output embeddings), where a scorer whose forward and backward disagree goes most wrong."""
    model_config = _model_config(ws["model_dir"], lora_dropout=0.0)
    trainer = build_trainer(model_config, _data(ws), _config(ws, output_dir, max_steps=1, **overrides))
    model, generator = trainer.model, torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
        model.get_output_embeddings().weight.mul_(60.0)
    indices = torch.arange(4)
    groups = trainer._groups(trainer.train_split, indices, [trainer.draws.positions(i) for i in indices.tolist()])
    trainer._forward(model, groups, indices, train=True)
    return {name: p.grad.double().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_bf16_step_gradients_match_float32(workspace, tmp_path):
    """bf16: true (CPU autocast) changes a step's LoRA gradients only by bf16 rounding of the trunk."""
    reference = _one_step_gradients(workspace, tmp_path / "fp32")
    mixed = _one_step_gradients(workspace, tmp_path / "bf16", bf16=True)
    flat_reference = torch.cat([g.flatten() for g in reference.values()])
    flat_mixed = torch.cat([mixed[name].flatten() for name in reference])
    assert flat_reference.norm() > 0
    relative_error = ((flat_mixed - flat_reference).norm() / flat_reference.norm()).item()
    # bf16's relative rounding is 2^-8..2^-7; measured 0.005 here, 0.015 when the scorer's forward ran in bf16
    assert relative_error < 2**-7, relative_error


def test_a_one_step_run_changes_the_adapter(workspace, tmp_path):
    # 8 prompts, batch 8, 1 epoch = 1 optimizer step. With a fractional warmup that step ran at
    # learning rate 0 and the adapter came out equal to its initialisation.
    ws, model_config = workspace, _model_config(workspace["model_dir"])
    model, tokenizer = load_model(model_config)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    config = _config(ws, tmp_path / "one", num_train_epochs=1, per_device_train_batch_size=8, warmup_steps=0.1)
    result = train(model_config, _data(ws), config, model, tokenizer)
    assert result.metrics["train_loss"] > 0
    # LoRA starts with B = 0, so the first step's gradient reaches every lora_B and no lora_A
    lora_b = sorted(name for name in before if "lora_B" in name)
    changed = [name for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[name])]
    assert lora_b and sorted(changed) == lora_b, "the single step must update every lora_B"


def test_a_run_without_a_real_update_warns(workspace, tmp_path, caplog):
    ws, model_config = workspace, _model_config(workspace["model_dir"])
    config = _config(ws, tmp_path / "zero", num_train_epochs=1, per_device_train_batch_size=8, warmup_steps=1)
    with caplog.at_level("WARNING", logger="dftlite.trainer"):
        train(model_config, _data(ws), config)
    assert any("all have learning rate 0" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("scoring_dropout", [False, True])
def test_dropout_while_scoring(workspace, tmp_path, monkeypatch, scoring_dropout):
    """scoring_dropout: false (the default) scores the trainee with every dropout module off, so the same
    sequences score the same twice within a training step; true keeps LoRA dropout (0.5 here) on."""
    ws = workspace
    model_config = _model_config(ws["model_dir"], lora_dropout=0.5)
    trainer = build_trainer(model_config, _data(ws), _config(ws, tmp_path, max_steps=1, scoring_dropout=scoring_dropout))
    with torch.no_grad():  # LoRA starts with B = 0, where dropout on its input could not show
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)
    seen = {}

    def spy(model, groups, indices, train, scale=1.0, counted=True):
        dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        batch = pad_groups(groups, trainer.pad_id, trainer.args.device)
        first, second = (trainer._sequence_logprobs(model, sequence_logprobs, batch)[0] for _ in range(2))
        seen.update(dropouts=len(dropouts), active=any(m.training for m in dropouts), same=torch.equal(first, second),
                    model_training=model.training)
        return torch.zeros(()), None

    monkeypatch.setattr(trainer, "_forward", spy)
    trainer.train()
    assert seen["dropouts"] > 0 and seen["model_training"]
    assert seen["active"] is scoring_dropout
    assert seen["same"] is (not scoring_dropout)
