"""Helpers of the fault suite: run settings shared by in-process and CLI runs, subprocesses, file checks.

A CLI run and an in-process run with the same settings compute the same thing bit for bit (CPU, fp32,
one thread), so a run that was killed and resumed can be compared with an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dftlite.data import DataConfig
from dftlite.models import ModelConfig
from dftlite.trainer import DFTConfig

HUB_TOKEN = "hf_dftliteTESTtoken123"  # set in every subprocess's environment; must never reach a file
TRAIN_PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]
STEPS = 16  # 8 prompts, 1 per step, 2 epochs
TRAIN_SETTINGS = dict(per_device_train_batch_size=1, num_train_epochs=2, learning_rate=1e-2, seed=0,
                      save_strategy="steps", save_steps=1, disable_tqdm=True)
MODEL_SETTINGS = dict(precision="fp32", lora_r=8)
POOL_SETTINGS = dict(num_negatives=4, max_new_tokens=8)  # B=2 negatives × 2 epochs
# What a checkpoint holds once complete; trainer_state.json is written last.
CHECKPOINT_FILES = ("adapter_model.safetensors", "dft_state.safetensors", "dft_state.json", "optimizer.pt",
                    "scheduler.pt", "rng_state.pth", "trainer_state.json")


def rows(pairs) -> list[dict]:
    return [{"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}"} for a, b in pairs]


def model_config(model_dir) -> ModelConfig:
    return ModelConfig(model_name_or_path=str(model_dir), **MODEL_SETTINGS)


def data_config(ws) -> DataConfig:
    return DataConfig(data_path=str(ws["train"]))


def dft_config(ws, output_dir, **overrides) -> DFTConfig:
    settings = {**TRAIN_SETTINGS, "output_dir": str(output_dir), "use_cpu": True, "pool_dir": str(ws["pool"]),
                "log_level": "error", **overrides}
    return DFTConfig(**settings)


def flags(settings: dict) -> list[str]:
    """{"lora_r": 8, "use_cpu": True} -> ["--lora_r", "8", "--use_cpu", "true"]: the CLI's --field value form."""
    out = []
    for key, value in settings.items():
        out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def train_flags(ws, output_dir, **overrides) -> list[str]:
    settings = {"model_name_or_path": ws["model_dir"], **MODEL_SETTINGS, "data_path": ws["train"],
                "pool_dir": ws["pool"], "output_dir": output_dir, "use_cpu": True, **TRAIN_SETTINGS, **overrides}
    return ["train", *flags(settings)]


def cli_env() -> dict:
    # one thread, as in-process (fp32 sums then agree bit for bit); unbuffered, so logs show progress
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_TOKEN": HUB_TOKEN, "HUGGING_FACE_HUB_TOKEN": HUB_TOKEN}


def start_cli(args: list[str], log_dir: Path, name: str) -> subprocess.Popen:
    """`python -m dftlite.cli ARGS` in the background; stdout and stderr go to log_dir/name.{out,err}."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out, err = open(log_dir / f"{name}.out", "wb"), open(log_dir / f"{name}.err", "wb")
    with out, err:
        return subprocess.Popen([sys.executable, "-m", "dftlite.cli", *args], stdout=out, stderr=err, env=cli_env(),
                                cwd=log_dir)


def log_text(log_dir: Path, name: str) -> str:
    return (log_dir / f"{name}.out").read_text(errors="replace") + (log_dir / f"{name}.err").read_text(errors="replace")


def signal_when(process: subprocess.Popen, ready, signum: int, timeout: float = 120.0):
    """Send `signum` to `process` as soon as `ready()` holds; fail if it finished or hung before."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before the fault could be injected")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("no progress before the timeout")
        time.sleep(0.01)
    process.send_signal(signum)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running {timeout:.0f}s after signal {signal.Signals(signum).name}")


def checkpoints(run_dir) -> dict[int, Path]:
    """{step: directory} of every checkpoint-N directory, complete or not."""
    found = {}
    for path in Path(run_dir).glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if path.is_dir() and suffix.isdigit():
            found[int(suffix)] = path
    return dict(sorted(found.items()))


def is_complete(checkpoint: Path) -> bool:
    if not all((checkpoint / name).is_file() for name in CHECKPOINT_FILES):
        return False
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except ValueError:
        return False
    return True


def same_tensors(path_a, path_b) -> bool:
    a, b = load_file(str(path_a)), load_file(str(path_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def load_torch_state(path):
    """A Trainer state file, loaded as the Trainer loads it: weights_only=True (numpy RNG state allowlisted)."""
    from transformers.trainer_pt_utils import safe_globals

    with safe_globals():
        return torch.load(path, map_location="cpu", weights_only=True)


def same_state(a, b) -> bool:
    """Equal nested state (optimizer/scheduler state dicts): tensors bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_checkpoint(checkpoint: Path, reference: Path):
    """The model, the u table + draw state, and the optimizer state of `checkpoint` equal `reference`'s."""
    for name in ("adapter_model.safetensors", "dft_state.safetensors"):
        assert same_tensors(checkpoint / name, reference / name), f"{checkpoint.name}/{name} differs"
    for name in ("optimizer.pt", "scheduler.pt"):
        assert same_state(load_torch_state(checkpoint / name), load_torch_state(reference / name)), \
            f"{checkpoint.name}/{name} differs"


def assert_same_result(run_dir: Path, reference_dir: Path):
    """The final adapter and u table + draw state of a run equal those of the uninterrupted reference."""
    for name in ("adapter/adapter_model.safetensors", "dft_state.safetensors"):
        assert same_tensors(run_dir / name, reference_dir / name), f"{name} differs from the uninterrupted run"


def files_containing(needle: str, *roots) -> list[str]:
    """Every file under `roots` (files or directories) whose bytes contain `needle`."""
    hits = []
    for root in map(Path, roots):
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            if needle.encode() in path.read_bytes():
                hits.append(str(path))
    return hits


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str, read_only: bool = False):
    """A tmpfs of `size` mounted at `path` (root only); skips the test where mounting is not allowed.
    A real full disk (ENOSPC), or with read_only a directory that even root cannot write (EROFS)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
