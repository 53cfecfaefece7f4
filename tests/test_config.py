"""YAML + command-line config parsing, errors listing valid keys, and the saved resolved config."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from dftlite.config import ConfigError, parse_args, save_resolved_config
from dftlite.data import DataConfig
from dftlite.models import ModelConfig

TYPES = [ModelConfig, DataConfig]


def _yaml(tmp_path, mapping):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return str(path)


def test_yaml_then_overrides(tmp_path):
    path = _yaml(tmp_path, {"lora_r": 8, "precision": "fp32", "data_path": "x.jsonl", "max_length": 300})
    model, data = parse_args(TYPES, ["--config", path, "--lora_r", "4"])
    assert (model.lora_r, model.precision, data.data_path, data.max_length) == (4, "fp32", "x.jsonl", 300)
    assert model.lora_alpha == 32  # untouched default


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lora_rank'\]: .*Valid keys: .*lora_r"):
        parse_args(TYPES, ["--config", _yaml(tmp_path, {"lora_rank": 8})])


@pytest.mark.parametrize("key, value", [("lora_r", "eight"), ("lora_dropout", "x"), ("precision", "3bit"),
                                        ("gradient_checkpointing", "yes"), ("max_examples", 1.5)])
def test_wrong_types_are_errors(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key):
        parse_args(TYPES, ["--config", _yaml(tmp_path, {key: value})])


def test_post_init_validation_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="max_length"):
        parse_args(TYPES, ["--config", _yaml(tmp_path, {"max_length": 1})])


def test_resolved_config_round_trips(tmp_path):
    model, data = parse_args(TYPES, ["--lora_r", "4", "--data_path", "d.jsonl"])
    path = save_resolved_config(tmp_path / "out", model, data)
    saved = yaml.safe_load(path.read_text())
    assert saved["lora_r"] == 4 and saved["data_path"] == "d.jsonl"
    again = parse_args(TYPES, ["--config", str(path)])
    assert again == (model, data)


def test_cli_help_lists_the_five_commands():
    out = subprocess.run([sys.executable, "-m", "dftlite.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ["sample", "train", "eval", "export", "demo"]:
        assert f"    {command}" in out.stdout
    version = subprocess.run([sys.executable, "-m", "dftlite.cli", "--version"], capture_output=True, text=True)
    assert version.stdout.strip().startswith("dftlite 0.")


def test_cli_reports_config_errors_cleanly(tmp_path):
    path = _yaml(tmp_path, {"no_such_field": 1})
    out = subprocess.run([sys.executable, "-m", "dftlite.cli", "sample", "--config", path], capture_output=True, text=True)
    assert out.returncode == 1
    assert "unknown key(s) ['no_such_field']" in out.stderr and "Traceback" not in out.stderr


def test_recipe_keys_of_other_commands_are_allowed_and_dropped(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class OtherCommand:
        temperature: float = 0.7

    path = _yaml(tmp_path, {"lora_r": 2, "temperature": 0.9})
    model, data = parse_args(TYPES, ["--config", path], shared_types=[OtherCommand])
    assert model.lora_r == 2
    with pytest.raises(ConfigError, match="temperature"):
        parse_args(TYPES, ["--config", _yaml(tmp_path, {"temperature": "hot"})], shared_types=[OtherCommand])
    with pytest.raises(ConfigError, match="unknown key"):
        parse_args(TYPES, ["--config", path])


def test_yaml_typo_suggests_the_nearest_key_and_lists_only_settable_ones(tmp_path):
    from dftlite.trainer import DFTConfig

    with pytest.raises(ConfigError) as err:
        parse_args([ModelConfig, DataConfig, DFTConfig], ["--config", _yaml(tmp_path, {"learning_rat": 1e-4})])
    message = str(err.value)
    assert "did you mean learning_rate (not learning_rat)?" in message
    valid = message.split("Valid keys: ")[1].split(", ")
    assert "learning_rate" in valid and "lora_r" in valid and "data_path" in valid
    assert "hub_token" not in valid and "remove_unused_columns" not in valid  # refused / fixed: not offered


def test_command_line_typos_and_abbreviations_are_refused_with_a_suggestion(tmp_path):
    # argparse would take --max_example as an abbreviation of --max_examples and run the job
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['--max_example'\]: did you mean --max_examples"):
        parse_args(TYPES, ["--max_example", "4"], "dftlite sample")
    with pytest.raises(ConfigError, match=r"did you mean --lora_r \(not --lora_rr\)"):
        parse_args(TYPES, ["--lora_rr=4"])
    with pytest.raises(ConfigError, match="no similar key"):
        parse_args(TYPES, ["--zzz", "1"])
    from dataclasses import dataclass

    @dataclass
    class OtherCommand:
        temperature: float = 0.7

    with pytest.raises(ConfigError, match="--temperature is a OtherCommand setting, for another dftlite command"):
        parse_args(TYPES, ["--temperature", "0.5"], shared_types=[OtherCommand])
    assert parse_args(TYPES, ["--max_examples", "4"])[1].max_examples == 4  # the full name still works


def test_cli_refuses_an_abbreviated_option_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dftlite.cli", "sample", "--max_example", "4"], capture_output=True, text=True)
    assert out.returncode == 1 and "did you mean --max_examples" in out.stderr and "Traceback" not in out.stderr


def test_train_help_does_not_offer_refused_keys():
    out = subprocess.run([sys.executable, "-m", "dftlite.cli", "train", "--help"], capture_output=True, text=True, check=True)
    assert "--learning_rate" in out.stdout and "--hub_token" not in out.stdout


@pytest.mark.parametrize("command", [[], ["train"], ["sample"], ["eval"]])  # train imports every library the others do
def test_help_prints_no_warning_or_library_noise(command):
    # -W default shows every warning Python would otherwise hide; none may reach the user on --help
    out = subprocess.run([sys.executable, "-W", "default", "-m", "dftlite.cli", *command, "--help"],
                         capture_output=True, text=True, check=True)
    assert out.stderr == "" and "usage: dftlite" in out.stdout
