"""Security: remote code stays off unless enabled, weights are safetensors only, torch state loads with
weights_only=True, and the Hub token never reaches a log, config, checkpoint, pool, export or model card.

The token check runs the whole pipeline (sample → train with checkpoints → eval → export, merged) as
the CLI in one subprocess with a recognisable token in HF_TOKEN and HUGGING_FACE_HUB_TOKEN (and in a
recipe's `env:`), then scans every byte of every file it wrote and of its stdout and stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dftlite.config import parse_args
from dftlite.models import ModelConfig, load_model
from faults.common import (
    HUB_TOKEN,
    MODEL_SETTINGS,
    POOL_SETTINGS,
    cli_env,
    data_config,
    dft_config,
    files_containing,
    flags,
    load_torch_state,
    model_config,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TRAINER_STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth")  # torch state, not weights
DRIVER = """
import json, sys
from dftlite.cli import main
for args in json.loads(sys.argv[1]):
    code = main(args)
    if code:
        sys.exit(code)
"""


@pytest.fixture(scope="module")
def pipeline(workspace, tmp_path_factory) -> Path:
    """out/: pool, run (3 steps, a checkpoint each), eval.json, export (merged); logs/: stdout, stderr."""
    root = tmp_path_factory.mktemp("security")
    out, recipe = root / "out", root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"env": {"HF_TOKEN": HUB_TOKEN}, **POOL_SETTINGS}))
    model = {"model_name_or_path": workspace["model_dir"], **MODEL_SETTINGS}
    data = {"data_path": workspace["train"]}
    commands = [
        ["sample", "--config", str(recipe), *flags({**model, **data, "pool_dir": out / "pool"})],
        ["train", *flags({**model, **data, "pool_dir": out / "pool", "output_dir": out / "run", "use_cpu": True,
                          "max_steps": 3, "save_steps": 1, "per_device_train_batch_size": 2,
                          "logging_steps": 1, "disable_tqdm": True})],
        ["eval", *flags({**model, **data, "adapter_path": out / "run" / "adapter", "pool_dir": out / "pool",
                         "json_path": out / "run" / "eval.json", "max_new_tokens": 4})],
        ["export", *flags({**model, "adapter_path": out / "run" / "adapter", "export_dir": out / "export",
                           "merge": True, "merge_dtype": "fp32"})],
    ]
    logs = root / "logs"
    logs.mkdir()
    with open(logs / "stdout", "wb") as stdout, open(logs / "stderr", "wb") as stderr:
        done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([[str(a) for a in c] for c in commands])],
                              stdout=stdout, stderr=stderr, env=cli_env(), cwd=root, timeout=300)
    assert done.returncode == 0, (logs / "stderr").read_text()[-3000:]
    assert (out / "export" / "merged" / "config.json").is_file() and (out / "run" / "checkpoint-3").is_dir()
    return root


def written_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "out").rglob("*") if p.is_file())


def test_hub_token_from_the_environment_is_never_written(pipeline):
    files = written_files(pipeline)
    assert len(files) > 40  # pool, config, checkpoints, adapter, eval.json, export, model card
    assert not files_containing(HUB_TOKEN, pipeline / "out", pipeline / "logs")


def test_hub_token_as_a_training_argument_is_refused(workspace, tmp_path, capsys):
    """TrainingArguments would pickle hub_token into every checkpoint (training_args.bin): refused, before
    anything is loaded or written; the token goes in HF_TOKEN."""
    from dftlite.cli import main

    token = "hf_dftliteARGUMENTtoken456"
    args = flags({"model_name_or_path": workspace["model_dir"], **MODEL_SETTINGS, "data_path": workspace["train"],
                  "pool_dir": workspace["pool"], "output_dir": tmp_path / "run", "hub_token": token})
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert "hub_token is not accepted" in err and "HF_TOKEN" in err and token not in err
    assert not (tmp_path / "run").exists()


def test_weights_are_safetensors_only(pipeline):
    files = written_files(pipeline)
    weights = [p for p in files if p.name.startswith(("adapter_model", "model", "pytorch_model", "dft_state"))
               and p.suffix != ".json"]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    # the only torch-serialised files: the Trainer's optimizer, scheduler and RNG state in checkpoints, and
    # its pickled arguments (see test_only_torch_state_is_pickled); none in the export
    assert {p.name for p in pickles} <= {*TRAINER_STATE, "training_args.bin"}, pickles
    assert not any("export" in p.relative_to(pipeline).parts for p in pickles)


def test_trainer_state_loads_with_weights_only(pipeline):
    state_files = [p for p in written_files(pipeline) if p.name in TRAINER_STATE]
    assert len(state_files) == 3 * 3  # 3 checkpoints
    for path in state_files:
        load_torch_state(path)  # weights_only=True; raises on anything but tensors and plain containers


def test_only_torch_state_is_pickled(pipeline):
    for path in written_files(pipeline):
        if path.suffix in PICKLE_SUFFIXES:
            load_torch_state(path)


def test_resume_loads_torch_state_with_weights_only(workspace, reference_run, tmp_path, monkeypatch):
    from dftlite.trainer import train

    calls, real_load = [], torch.load

    def recording_load(*args, **kwargs):
        calls.append((str(args[0] if args else kwargs.get("f")), kwargs.get("weights_only")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    config = dft_config(workspace, tmp_path / "run", resume_from_checkpoint=str(reference_run / "checkpoint-15"),
                        save_strategy="no")
    train(model_config(workspace["model_dir"]), data_config(workspace), config)
    loaded = {Path(path).name for path, _ in calls}
    assert set(TRAINER_STATE) <= loaded, calls
    assert all(weights_only is True for _, weights_only in calls), calls


def test_trust_remote_code_is_off_unless_enabled(tiny_model_dir, tmp_path, monkeypatch):
    """A model directory whose config maps the model to its own code file: that code runs only when
    the user sets trust_remote_code (checked: it runs then, writing a marker file)."""
    import shutil

    from transformers import dynamic_module_utils

    (parsed,) = parse_args([ModelConfig], [])  # what every command gets without --trust_remote_code
    assert parsed.trust_remote_code is False
    for recipe in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"):
        assert yaml.safe_load(recipe.read_text()).get("trust_remote_code") in (None, False), recipe

    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "remote-code-model")
    marker = tmp_path / "remote code ran"
    (model_dir / "custom_llama.py").write_text(
        "from pathlib import Path\n"
        "from transformers import LlamaForCausalLM\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "class CustomLlama(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom_llama.CustomLlama"}
    (model_dir / "config.json").write_text(json.dumps(config))

    model, _ = load_model(ModelConfig(model_name_or_path=str(model_dir), precision="fp32", lora_r=0))
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()

    # the control: with the switch on, the directory's code does run (imported from a private modules cache)
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    trusted, _ = load_model(ModelConfig(model_name_or_path=str(model_dir), precision="fp32", lora_r=0,
                                        trust_remote_code=True))
    assert type(trusted).__name__ == "CustomLlama" and marker.read_text() == "ran"
