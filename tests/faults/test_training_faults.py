"""Training under faults: Ctrl-C and kill -9 of a real `dftlite train` process, and a NaN loss.

Each interrupted run is resumed from its last checkpoint and compared, tensor for tensor, with the
uninterrupted reference run (CPU, fp32, one thread: deterministic): the checkpoints hold the same
adapter, u table, draw state and optimizer state, and the resumed run ends with the same adapter.
"""

from __future__ import annotations

import contextlib
import errno
import io
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dftlite import losses
from dftlite.config import ConfigError
from dftlite.trainer import NonFiniteLossError, train
from faults.common import (
    HUB_TOKEN,
    STEPS,
    assert_same_checkpoint,
    assert_same_result,
    checkpoints,
    data_config,
    dft_config,
    files_containing,
    is_complete,
    log_text,
    model_config,
    signal_when,
    small_tmpfs,
    start_cli,
    train_flags,
)


def resume(ws, output_dir, checkpoint, **overrides):
    return train(model_config(ws["model_dir"]), data_config(ws),
                 dft_config(ws, output_dir, resume_from_checkpoint=str(checkpoint), **overrides))


def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_is_exact(workspace, reference_run, tmp_path):
    ws, run_dir = workspace, tmp_path / "run"
    no_regular_saves = {"save_steps": 1000}  # so the only checkpoint is the one Ctrl-C makes
    process = start_cli(train_flags(ws, run_dir, **no_regular_saves), tmp_path, "train")
    signal_when(process, lambda: "'loss'" in (tmp_path / "train.out").read_text(), signal.SIGINT)  # after step 1

    logs = log_text(tmp_path, "train")
    assert process.returncode == 130, logs
    saved = checkpoints(run_dir)
    assert len(saved) == 1, logs
    (step, checkpoint), = saved.items()
    assert 1 <= step < STEPS and is_complete(checkpoint)
    assert f"checkpoint saved at step {step}" in logs and "--resume_from_checkpoint" in logs
    assert not (run_dir / "adapter").exists()  # an interrupted run writes no final adapter
    assert_same_checkpoint(checkpoint, reference_run / f"checkpoint-{step}")

    resume(ws, run_dir, checkpoint, **no_regular_saves)
    assert_same_result(run_dir, reference_run)
    assert load_file(str(run_dir / "dft_state.safetensors"))["visits"].tolist() == [2] * 8
    assert not files_containing(HUB_TOKEN, run_dir, tmp_path / "train.out", tmp_path / "train.err")


def test_kill_9_resumes_from_the_last_complete_checkpoint_exactly(workspace, reference_run, tmp_path):
    ws, run_dir = workspace, tmp_path / "run"
    process = start_cli(train_flags(ws, run_dir), tmp_path, "train")
    signal_when(process, lambda: (run_dir / "checkpoint-2" / "trainer_state.json").is_file(), signal.SIGKILL)

    assert process.returncode == -signal.SIGKILL
    complete = [step for step, path in checkpoints(run_dir).items() if is_complete(path)]
    assert complete and complete == list(range(1, complete[-1] + 1)), complete
    last = complete[-1]
    assert 2 <= last < STEPS, "killed too late to leave work to resume"
    assert not (run_dir / "adapter").exists()
    for step in complete:  # every complete checkpoint holds exactly the state of the uninterrupted run
        assert_same_checkpoint(checkpoints(run_dir)[step], reference_run / f"checkpoint-{step}")

    # kill -9 during a save leaves checkpoint-(last+1) half written (the dft state first, the Trainer
    # state last); if this kill did not, make one as it would. Resuming from it must be refused.
    partial = run_dir / f"checkpoint-{last + 1}"
    if not partial.exists():
        partial.mkdir()
        for name in ("dft_state.safetensors", "dft_state.json", "adapter_model.safetensors", "adapter_config.json"):
            shutil.copy(run_dir / f"checkpoint-{last}" / name, partial / name)
    with pytest.raises(Exception, match=f"checkpoint-{last + 1}"):
        resume(ws, run_dir, partial)

    resume(ws, run_dir, run_dir / f"checkpoint-{last}")
    assert_same_result(run_dir, reference_run)
    assert_same_checkpoint(run_dir / f"checkpoint-{STEPS}", reference_run / f"checkpoint-{STEPS}")  # optimizer too
    assert not files_containing(HUB_TOKEN, run_dir, tmp_path / "train.out", tmp_path / "train.err")


def test_resume_last_skips_a_half_written_checkpoint(workspace, reference_run, tmp_path):
    ws, run_dir = workspace, tmp_path / "run"
    for step in range(1, 6):
        shutil.copytree(reference_run / f"checkpoint-{step}", run_dir / f"checkpoint-{step}")
    partial = run_dir / "checkpoint-6"  # as kill -9 leaves it: the dft state and the adapter, no Trainer state
    partial.mkdir()
    for name in ("dft_state.safetensors", "dft_state.json", "adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(reference_run / "checkpoint-6" / name, partial / name)
    with pytest.raises(ConfigError, match=r"checkpoint-6 is an incomplete checkpoint.*checkpoint-5"):
        resume(ws, run_dir, partial)
    resume(ws, run_dir, "last")
    assert_same_result(run_dir, reference_run)


def test_nan_loss_stops_with_the_last_good_checkpoint_kept(workspace, reference_run, tmp_path, monkeypatch):
    ws, run_dir = workspace, tmp_path / "run"
    calls = []
    real_loss = losses.dft2_loss

    def nan_at_step_3(*args, **kwargs):
        loss, new_log_u, metrics = real_loss(*args, **kwargs)
        calls.append(1)  # one micro-batch per step
        return (loss * float("nan"), new_log_u, metrics) if len(calls) == 3 else (loss, new_log_u, metrics)

    monkeypatch.setattr(losses, "dft2_loss", nan_at_step_3)  # method_loss calls it for method dft2
    with pytest.raises(NonFiniteLossError, match=r"step 3: non-finite loss.*Last good checkpoint: .*checkpoint-2"):
        train(model_config(ws["model_dir"]), data_config(ws), dft_config(ws, run_dir))
    saved = checkpoints(run_dir)
    assert list(saved) == [1, 2] and all(is_complete(path) for path in saved.values())
    assert_same_checkpoint(saved[2], reference_run / "checkpoint-2")  # the state before the NaN, untouched
    assert all(torch.isfinite(t).all() for t in load_file(str(saved[2] / "adapter_model.safetensors")).values())
    assert not (run_dir / "adapter").exists() and not (run_dir / "dft_state.safetensors").exists()


@contextlib.contextmanager
def full_disk(disk: str, root: Path, monkeypatch, tmpfs_size: str, fail_on: str):
    """A directory under `root` whose disk fills up: a real small tmpfs, or writes of the Trainer's
    `fail_on` file (optimizer.pt / the tokenizer) that fail with ENOSPC after part of the file landed."""
    if disk == "tmpfs":
        with small_tmpfs(root / "small", tmpfs_size) as mounted:
            yield mounted
        return
    if fail_on == "optimizer.pt":
        real_save = torch.save

        def filling_save(obj, target, *args, **kwargs):
            if str(target).endswith("checkpoint-2/optimizer.pt"):
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                Path(target).write_bytes(buffer.getvalue()[: buffer.tell() // 2])
                raise OSError(errno.ENOSPC, "No space left on device", str(target))
            return real_save(obj, target, *args, **kwargs)

        monkeypatch.setattr(torch, "save", filling_save)
    else:
        from transformers import PreTrainedTokenizerBase

        def no_space(self, directory, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory) / "tokenizer.json"))

        monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", no_space)
    yield root
    monkeypatch.undo()


def train_until_disk_full(ws, run_dir, **overrides):
    with pytest.raises(Exception) as error:
        train(model_config(ws["model_dir"]), data_config(ws), dft_config(ws, run_dir, **overrides))
    return error.value


# checkpoint-1 and the config fit in 400k (tmpfs pages), checkpoint-2 does not
CHECKPOINT_DISK = dict(tmpfs_size="400k", fail_on="optimizer.pt")


@pytest.mark.parametrize("disk", ["failing writes", "tmpfs"])
def test_full_disk_while_saving_a_checkpoint_keeps_the_last_complete_one(workspace, reference_run, tmp_path,
                                                                         monkeypatch, disk):
    with full_disk(disk, tmp_path, monkeypatch, **CHECKPOINT_DISK) as root:
        train_until_disk_full(workspace, root / "run")
        run_dir = shutil.copytree(root / "run", tmp_path / "roomy")  # then space is made
    saved = checkpoints(run_dir)
    complete = [step for step, path in saved.items() if is_complete(path)]
    assert complete == [1], sorted(saved)
    assert_same_checkpoint(saved[1], reference_run / "checkpoint-1")
    assert not (run_dir / "adapter").exists()
    for step in set(saved) - {1}:  # a half-written checkpoint is never taken for a valid one
        with pytest.raises(Exception, match=f"checkpoint-{step}"):
            resume(workspace, run_dir, saved[step])


@pytest.mark.parametrize("disk", ["failing writes", "tmpfs"])
def test_full_disk_while_saving_a_checkpoint_is_a_clear_error_and_leaves_nothing_half_written(
        workspace, tmp_path, monkeypatch, disk):
    with full_disk(disk, tmp_path, monkeypatch, **CHECKPOINT_DISK) as root:
        error = train_until_disk_full(workspace, root / "run")
        assert isinstance(error, OSError) and "No space left on device" in str(error), repr(error)
        assert "checkpoint-2" in str(error)
        assert sorted(checkpoints(root / "run")) == [1]


@pytest.mark.parametrize("disk", ["failing writes", "tmpfs"])
def test_full_disk_while_saving_the_adapter_leaves_no_partial_adapter(workspace, tmp_path, monkeypatch, disk):
    with full_disk(disk, tmp_path, monkeypatch, tmpfs_size="64k", fail_on="tokenizer") as root:
        run_dir = root / "run"
        error = train_until_disk_full(workspace, run_dir, save_strategy="no", max_steps=2)
        assert isinstance(error, OSError) and "No space left on device" in str(error), repr(error)
        assert not (run_dir / "adapter").exists() and not (run_dir / "dft_state.safetensors").exists()
        assert sorted(p.name for p in run_dir.iterdir()) == ["dftlite_config.yaml"]

