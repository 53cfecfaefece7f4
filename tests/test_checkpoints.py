"""dftlite.checkpoints on its own. Saving, resuming and interrupting real runs: tests/test_trainer.py and
the fault suite (tests/faults/test_training_faults.py)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dftlite import checkpoints


def test_checkpoint_names_are_the_trainers():
    assert checkpoints.TRAINER_STATE == TRAINER_STATE_NAME and checkpoints.CHECKPOINT_PREFIX == PREFIX_CHECKPOINT_DIR


def _lora_model(model_dir, seed: int, target: str = "q_proj"):
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules=[target]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_()
    return model


def test_load_sharded_adapter_reads_the_adapter_peft_saved(tiny_model_dir, tmp_path):
    """The FSDP resume's loader on an unsharded model (set_model_state_dict takes both): the saved file's keys,
    which drop the adapter's name, land on the model's own parameters; a file of another adapter is refused."""
    saved = _lora_model(tiny_model_dir, seed=1)
    saved.save_pretrained(tmp_path / "ckpt")
    target = _lora_model(tiny_model_dir, seed=2)
    checkpoints.load_sharded_adapter(target, tmp_path / "ckpt")
    expected = {n: p for n, p in saved.named_parameters() if "lora_" in n}
    assert expected and all(torch.equal(p, expected[n]) for n, p in target.named_parameters() if "lora_" in n)

    with pytest.raises(ValueError, match="not this model's adapter"):
        checkpoints.load_sharded_adapter(_lora_model(tiny_model_dir, seed=3, target="v_proj"), tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        checkpoints.load_sharded_adapter(target, tmp_path)
