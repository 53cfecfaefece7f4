"""Mistyped inputs that used to wait on the network or read like errors.

- A data_path that is a local path by its shape (a data-file extension, ./, ../, /) and is missing:
  "not found" with the absolute path tried, and no attempt to reach the Hub.
- A Hub-shaped data_path (owner/name) that cannot be loaded offline: one line that says so.
- A model name that is neither an alias nor a path: said at once, with the nearest alias.
- A truncated JSONL line: the column is the line's, not "column 1" of the next.
- bitsandbytes' Hub-kernel warning stays off the screen unless --verbose is given.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import socket
import subprocess
import sys

import pytest

from dftlite.cli import main
from dftlite.data import DataConfig, DataError, load_data, load_examples
from dftlite.models import resolve_model_path, resolve_model_source
from faults.common import cli_env, flags


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test on any attempt to load a Hub dataset or to open a connection."""
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError(f"network attempt: {args} {kwargs}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("value", ["data/train.jsonl", "data/metamathqa.jsonl", "data/train.parquet", "train.jsonl",
                                   "./train", "../elsewhere/train", "/nonexistent/train", "owner/name.json"])
def test_a_missing_local_path_is_not_found_without_the_network(value, tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as error:
        load_data(DataConfig(data_path=value))
    expected = os.path.normpath(os.path.join(tmp_path, value))  # an absolute value stays as it is
    assert str(error.value) == f"data file not found: {value} (looked for {expected})"


def test_a_missing_relative_path_from_the_command_line_is_one_line(tmp_path):
    """The issue's reproduction, as a real process without HF_HUB_OFFLINE: a Hub attempt would show
    as "Couldn't reach ... on the Hub" after its retries; "not found" means there was none."""
    env = {key: value for key, value in cli_env().items() if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    result = subprocess.run([sys.executable, "-m", "dftlite.cli", "sample", "--precision", "fp32", "--data_path",
                             "data/train.jsonl", "--pool_dir", str(tmp_path / "p")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"dftlite sample: error: data file not found: data/train.jsonl "
                                     f"(looked for {tmp_path / 'data' / 'train.jsonl'})"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing is written"


def test_a_hub_dataset_that_cannot_be_loaded_offline_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as error:
        load_data(DataConfig(data_path="someone/no-such-dataset"))
    message = str(error.value)
    assert message.startswith(f"someone/no-such-dataset: no such local file or directory ({tmp_path}/someone/no-such-dataset)")
    assert "(offline: HF_HUB_OFFLINE is set)" in message and "\n" not in message


@pytest.mark.parametrize("name, hint", [("smollm2-135m", " Did you mean 'smollm2-135m-instruct'?"),
                                        ("SmolLM2-135M-instruct", " Did you mean 'smollm2-135m-instruct'?"),
                                        ("./my-model", ""), ("llama", "")])
def test_a_mistyped_model_name_is_said_at_once(name, hint, tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        resolve_model_source(name)
    assert str(error.value) == (
        f"model_name_or_path {name!r} is neither a known alias (smollm2-135m-instruct) nor a local path "
        f"({os.path.normpath(os.path.join(tmp_path, name))} does not exist).{hint} A Hub model is given as owner/name, and needs "
        "the network or a local cache."
    )


def test_a_hub_id_and_a_local_directory_still_pass(tiny_model_dir, no_network):
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert resolve_model_source(str(tiny_model_dir)) == (str(tiny_model_dir), None)
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)


def test_an_uncached_hub_model_offline_is_one_line_naming_it(tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError) as error:
        resolve_model_path("someone/no-such-model")
    assert str(error.value).startswith(f"model_name_or_path 'someone/no-such-model' is not a local path "
                                       f"({tmp_path}/someone/no-such-model does not exist) and not in the local Hub cache")


def test_a_mistyped_model_name_is_one_line_from_the_command_line(tmp_path, capsys, no_network):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"}) + "\n")
    args = flags({"model_name_or_path": "smollm2-135m", "precision": "fp32", "data_path": data,
                  "pool_dir": tmp_path / "pool"})
    assert main(["sample", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dftlite sample: error: model_name_or_path 'smollm2-135m' is neither") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


def test_a_truncated_jsonl_line_points_at_its_real_column(tmp_path):
    good = json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"})
    cut = good[:30]  # '{"question": "What is 2 + 2?",' : the next key is missing
    path = tmp_path / "data.jsonl"
    path.write_text(good + "\n" + cut + "\n" + good + "\n")
    with pytest.raises(DataError) as error:
        load_examples(path)
    # the parser stops at the end of the cut line: column len(cut) + 1, on that line
    assert str(error.value) == f"{path}:2: malformed JSON (Expecting property name enclosed in double quotes at column {len(cut) + 1})"


def test_the_bitsandbytes_kernel_warning_shows_only_with_verbose():
    from bitsandbytes.backends.cpu import ops

    def help_output(*extra) -> str:
        result = subprocess.run([sys.executable, "-m", "dftlite.cli", "sample", "--help", *extra], env=cli_env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout + result.stderr

    assert "kernels-community" not in help_output()
    # bitsandbytes >= 0.50 tries the Hub kernel, and warns, only on CPUs with AVX512-BF16 and with
    # `kernels` installed (transformers >= 5.2x depends on it)
    if ops.has_avx512bf16() and "kernels-community" in inspect.getsource(ops) and importlib.util.find_spec("kernels"):
        # the wording is the packages' own and changes between releases; the repository id does not
        assert "kernels-community/quantization" in help_output("--verbose")
