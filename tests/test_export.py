"""Export: the adapter reloads bit-exact, the merged model reproduces base + adapter with plain
transformers, 4-bit training configs merge into full-precision weights, the model card, refusals,
and the Hub token never reaching a file (push_to_hub against a fake HfApi)."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import torch
import yaml
from safetensors import safe_open
from conftest import TINY_HUB_ID
from test_evaluate import make_adapter

from dftlite.config import to_dict
from dftlite.data import DataConfig
from dftlite.export import ExportConfig, export
from dftlite.models import ModelConfig, load_base_model, load_model

FAKE_TOKEN = "hf_dftliteFAKEtoken0123456789abcdefXYZ"
EVAL_RESULTS = {"num_examples": 5, "data_path": "dev.jsonl",
                "base": {"accuracy": 0.2, "win_rate": 0.4}, "adapter": {"accuracy": 0.6, "win_rate": 0.8}}


@pytest.fixture(scope="module")
def model_config(tiny_model_dir):
    return ModelConfig(model_name_or_path=str(tiny_model_dir), precision="fp32", lora_r=4)


@pytest.fixture(scope="module")
def run_dir(model_config, tmp_path_factory):
    """A training run as `dftlite train` leaves it: <run>/adapter, <run>/dftlite_config.yaml, plus an eval.json."""
    run = tmp_path_factory.mktemp("run")
    make_adapter(model_config, run / "adapter")
    config = {**to_dict(model_config, DataConfig(data_path="gsm8k_train.jsonl")),
              "method": "dft2", "tau": 1.0, "learning_rate": 2e-4, "logging_steps": 7, "pool_dir": "runs/pool"}
    (run / "dftlite_config.yaml").write_text(yaml.safe_dump(config))
    (run / "eval.json").write_text(json.dumps(EVAL_RESULTS))
    return run


@pytest.fixture(scope="module")
def reference(model_config, run_dir):
    """Base + the original adapter, and an input batch."""
    model, tokenizer = load_model(model_config, adapter_path=str(run_dir / "adapter"), trainable=False)
    model.eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Natalia sold 48 clips in April."}],
                                         tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return model, tokenizer, input_ids


TINY_ID = TINY_HUB_ID  # the tiny base sits in a Hub cache layout under this id (conftest)


def run_export(model_config, run_dir, export_dir, **kwargs):
    kwargs.setdefault("base_model_id", TINY_ID)
    return export(model_config, ExportConfig(adapter_path=str(run_dir / "adapter"), export_dir=str(export_dir), **kwargs))


def all_files(directory):
    return [p for p in directory.rglob("*") if p.is_file()]


def test_adapter_reloads_with_identical_logits(model_config, run_dir, reference, tmp_path):
    from peft import PeftModel

    out = run_export(model_config, run_dir, tmp_path / "out")
    names = {p.name for p in all_files(out)}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "dftlite_config.yaml", "export_config.yaml",
            "eval.json", "tokenizer_config.json"} <= names
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in all_files(out))
    assert not (out / "merged").exists()

    model, _, input_ids = reference
    base, _ = load_base_model(model_config)
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, model(input_ids).logits)

    card = (out / "README.md").read_text()
    assert "Discriminative Fine-Tuning" in card and "arxiv.org/abs/2502.18679" in card
    assert "not* Dynamic Fine-Tuning" in card
    assert "`method` | `dft2`" in card and "`learning_rate` | `0.0002`" in card and "`lora_r` | `4`" in card
    assert "logging_steps" not in card  # TrainingArguments plumbing stays off the card
    assert "gsm8k_train.jsonl" in card  # data
    assert "| accuracy | 0.2 | 0.6 |" in card  # metrics from the run's eval.json
    assert "AutoPeftModelForCausalLM.from_pretrained" in card and "merged" not in card
    assert "import dftlite" not in card and "from dftlite" not in card


def test_merged_fp32_reproduces_base_plus_adapter(model_config, run_dir, reference, tmp_path):
    from transformers import AutoModelForCausalLM

    out = run_export(model_config, run_dir, tmp_path / "out", merge=True, merge_dtype="fp32")
    assert not (out / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    assert not hasattr(merged, "peft_config") and merged.dtype == torch.float32

    model, tokenizer, input_ids = reference
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, model(input_ids).logits, atol=1e-4, rtol=0)
        kwargs = dict(do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
        theirs = model.generate(input_ids=input_ids, **kwargs)
        ours = merged.generate(input_ids=input_ids, **kwargs)
    assert ours.tolist() == theirs.tolist()
    card = (out / "README.md").read_text()
    assert "AutoModelForCausalLM.from_pretrained" in card and "subfolder='merged'" in card


@pytest.mark.parametrize("merge_dtype, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_merge_from_4bit_config_writes_full_precision(model_config, run_dir, tmp_path, caplog, merge_dtype, dtype):
    qlora_config = ModelConfig(model_name_or_path=model_config.model_name_or_path, precision="4bit", lora_r=4)
    qlora_run = tmp_path / "qlora_run"  # the same adapter, as if trained with QLoRA
    qlora_run.mkdir()
    (qlora_run / "adapter").symlink_to(run_dir / "adapter", target_is_directory=True)
    (qlora_run / "dftlite_config.yaml").write_text(yaml.safe_dump({**to_dict(qlora_config), "method": "dft2"}))
    with caplog.at_level("WARNING"):
        out = run_export(qlora_config, qlora_run, tmp_path / "out", merge=True, merge_dtype=merge_dtype)
    assert "unquantized" in caplog.text
    config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    base, _ = load_base_model(model_config)
    expected_shapes = {name: tuple(p.shape) for name, p in base.state_dict().items()}
    with safe_open(str(out / "merged" / "model.safetensors"), "pt") as weights:
        shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert dtypes == {str(dtype).removeprefix("torch.").replace("float32", "F32").replace("bfloat16", "BF16")}
    assert shapes == {k: v for k, v in expected_shapes.items() if k in shapes}  # unpacked: the base's shapes
    assert "model.layers.0.self_attn.q_proj.weight" in shapes
    assert "QLoRA" in (out / "README.md").read_text()


def test_non_empty_export_dir_is_refused_unless_overwrite(model_config, run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    with pytest.raises(FileExistsError, match="not empty"):
        run_export(model_config, run_dir, out)
    assert (out / "stale.txt").exists()
    run_export(model_config, run_dir, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "adapter_model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary directory is left behind"


def test_bad_inputs(model_config, run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        export(model_config, ExportConfig(adapter_path=str(tmp_path / "missing"), export_dir=str(tmp_path / "out")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        export(model_config, ExportConfig(adapter_path=str(tmp_path / "empty"), export_dir=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="holds the adapter"):  # --overwrite must not delete the run
        run_export(model_config, run_dir, run_dir, overwrite=True)
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="adapter_path is required"):
        ExportConfig(export_dir="x")
    with pytest.raises(ValueError, match="merge_dtype"):
        ExportConfig(adapter_path="a", export_dir="x", merge_dtype="4bit")
    assert not (tmp_path / "out").exists()


def test_cli_reports_refusal(model_config, run_dir, tmp_path, capsys):
    from dftlite.cli import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    argv = ["export", "--model_name_or_path", model_config.model_name_or_path, "--precision", "fp32",
            "--adapter_path", str(run_dir / "adapter"), "--export_dir", str(tmp_path / "out")]
    assert main(argv) == 1
    assert "not empty" in capsys.readouterr().err


class FakeHfApi:
    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        from pathlib import Path

        self.calls.append(("upload_folder", kwargs, sorted(p.name for p in Path(kwargs["folder_path"]).rglob("*"))))


def test_push_to_hub_and_the_token_is_never_written(model_config, run_dir, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    with caplog.at_level("DEBUG"):
        out = run_export(model_config, run_dir, tmp_path / "out", merge=True, merge_dtype="fp32",
                         push_to_hub="me/tiny-dft2", private=True)

    (_, token), (_, create), (_, upload, uploaded) = FakeHfApi.calls
    assert token == FAKE_TOKEN
    assert create == {"repo_id": "me/tiny-dft2", "repo_type": "model", "private": True, "exist_ok": True}
    assert upload["repo_id"] == "me/tiny-dft2" and upload["folder_path"] == str(out)
    assert {"README.md", "adapter_model.safetensors", "model.safetensors"} <= set(uploaded)
    card = (out / "README.md").read_text()
    assert "'me/tiny-dft2', subfolder='merged'" in card

    files = all_files(out)
    assert len(files) > 10
    for path in files:
        assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    captured = capsys.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err + caplog.text


def test_push_without_token_fails_before_writing(model_config, run_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ValueError, match="HF_TOKEN"):
        run_export(model_config, run_dir, tmp_path / "out", push_to_hub="me/x")
    assert not (tmp_path / "out").exists()


def test_export_refuses_to_write_the_token(model_config, run_dir, tmp_path, monkeypatch):
    """A training config that somehow holds the token's value is caught before anything is kept."""
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    leaky_run = tmp_path / "leaky"
    leaky_run.mkdir()
    (leaky_run / "adapter").symlink_to(run_dir / "adapter", target_is_directory=True)
    (leaky_run / "dftlite_config.yaml").write_text(yaml.safe_dump({"method": "dft2", "note": FAKE_TOKEN}))
    with pytest.raises(RuntimeError, match="HF_TOKEN"):
        run_export(model_config, leaky_run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["leaky"]


# ---- Hub-ready: the export loads with plain peft/transformers, its card passes the Hub's parser,
# and it names no path of this machine.

@pytest.fixture(scope="module")
def hub_cache(tiny_model_dir):
    """The Hub cache that holds the tiny base as dftlite-test/tiny-llama (conftest lays it out so)."""
    return tiny_model_dir.parent.parent.parent


def test_adapter_loads_with_autopeft_offline_without_dftlite(model_config, hub_cache, run_dir, reference, tmp_path):
    """The base id comes from the Hub cache layout of the base directory (no --base_model_id), and a fresh
    Python that never imports dftlite loads the export with AutoPeftModelForCausalLM, offline."""
    import os
    import subprocess
    import sys

    out = run_export(model_config, run_dir, tmp_path / "out", base_model_id=None)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == TINY_ID

    _, _, input_ids = reference
    torch.save(input_ids, tmp_path / "input_ids.pt")
    script = (
        "import sys, torch\n"
        "from peft import AutoPeftModelForCausalLM\n"
        f"model = AutoPeftModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"input_ids = torch.load({str(tmp_path / 'input_ids.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(input_ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
        "assert not any(name.startswith('dftlite') for name in sys.modules), 'dftlite was imported'\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    model, _, _ = reference
    with torch.no_grad():
        expected = model(input_ids).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), expected)


def test_card_metadata_passes_the_hub_parser(model_config, run_dir, tmp_path):
    from huggingface_hub import ModelCard

    (run_dir / "training_curves.png").write_bytes(b"\x89PNG\r\n\x1a\n fake")
    leaky = tmp_path / "run"  # data named by Hub id
    leaky.mkdir()
    (leaky / "adapter").symlink_to(run_dir / "adapter", target_is_directory=True)
    (leaky / "training_curves.png").write_bytes(b"\x89PNG\r\n\x1a\n fake")
    (leaky / "dftlite_config.yaml").write_text(yaml.safe_dump(
        {**to_dict(model_config), "method": "dft2", "data_path": "meta-math/MetaMathQA", "precision": "4bit"}))
    out = run_export(model_config, leaky, tmp_path / "out", merge=True, merge_dtype="fp32")
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == TINY_ID and data["library_name"] == "peft"
    assert data["pipeline_tag"] == "text-generation" and data["base_model_relation"] == "adapter"
    assert {f"base_model:adapter:{TINY_ID}", "lora", "dft", "discriminative-fine-tuning"} <= set(data["tags"])
    assert data["datasets"] == ["meta-math/MetaMathQA"]
    assert "arXiv:2502.18679" in card.text and "@article{guo2025discriminative" in card.text
    assert card.text.lstrip().startswith(f"# tiny-llama + DFT2")  # about the model, not `# out: ...`
    assert "![training curves](training_curves.png)" in card.text and (out / "training_curves.png").is_file()
    merged = ModelCard.load(out / "merged" / "README.md").data.to_dict()
    assert merged["base_model"] == TINY_ID and merged["base_model_relation"] == "finetune"
    assert merged["library_name"] == "transformers" and f"base_model:finetune:{TINY_ID}" in merged["tags"]


def test_local_base_without_hub_id_asks_for_base_model_id(model_config, run_dir, tmp_path):
    import shutil

    from dftlite.config import ConfigError

    plain = shutil.copytree(model_config.model_name_or_path, tmp_path / "my-model")  # not a Hub cache snapshot
    config = ModelConfig(model_name_or_path=str(plain), precision="fp32", lora_r=4)
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter").symlink_to(run_dir / "adapter", target_is_directory=True)
    with pytest.raises(ConfigError, match="--base_model_id org/name"):
        run_export(config, run, tmp_path / "out", base_model_id=None)
    assert not (tmp_path / "out").exists()
    assert json.loads(run_export(config, run, tmp_path / "out2").joinpath("adapter_config.json").read_text())[
        "base_model_name_or_path"] == TINY_ID


def test_export_names_no_path_of_this_machine(model_config, run_dir, tmp_path):
    """grep -r over the export: no absolute path of the run, the base, the data, the home or temp dirs."""
    import os
    import tempfile
    from pathlib import Path

    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter").symlink_to(run_dir / "adapter", target_is_directory=True)
    data = tmp_path / "data" / "train.jsonl"
    (run / "dftlite_config.yaml").write_text(yaml.safe_dump(
        {**to_dict(model_config, DataConfig(data_path=str(data))), "method": "dft2", "output_dir": str(run),
         "pool_dir": str(tmp_path / "pool")}))
    (run / "eval.json").write_text(json.dumps({**EVAL_RESULTS, "data_path": str(tmp_path / "dev.jsonl")}))
    out = run_export(model_config, run, tmp_path / "export", merge=True, merge_dtype="fp32")
    needles = {str(tmp_path), str(run_dir), model_config.model_name_or_path, str(Path.home()), os.getcwd(),
               tempfile.gettempdir()}
    for path in all_files(out):
        content = path.read_bytes()
        for needle in needles:
            assert needle.encode() not in content, f"{path.relative_to(out)} contains {needle}"
    card = (out / "README.md").read_text()
    assert "a local file, `train.jsonl`" in card and "a local file, `dev.jsonl`" in card
    assert yaml.safe_load((out / "dftlite_config.yaml").read_text())["data_path"] == "<local path>/train.jsonl"
