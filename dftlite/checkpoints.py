"""Training checkpoints of `dftlite train`: which are whole, where to resume, and DFT's state in them.

A checkpoint-N directory is the Trainer's (adapter, optimizer, scheduler, RNG, trainer_state.json)
plus DFT's own state: dft_state.safetensors (the u table and the draw counts) and dft_state.json
(what that state is valid for: method, data, seed, B).

- `is_complete_checkpoint`, `last_complete_checkpoint`, `incomplete_checkpoint_message`: a
  checkpoint is whole when its trainer_state.json, written last, parses; a run killed while saving
  leaves one without it, which resuming skips (`--resume_from_checkpoint last`) or names.
- `resume_checkpoint`: what `resume_from_checkpoint` names ('last': the newest complete one).
- `dft_state_meta`, `save_dft_state`, `load_dft_state`: DFT's state, each file whole; loading
  refuses a state made with other settings.
- `load_sharded_adapter`: a checkpoint's adapter into an FSDP-sharded model (resuming under FSDP).
- `checkpoint_guard`: a save that fails (a full disk, a second Ctrl-C) leaves no checkpoint that
  looks resumable.
- `SaveOnInterrupt`: Ctrl-C saves a checkpoint at the end of this step, then stops.

Locks and whole files are `dftlite.outputs`; the Trainer's own save and load are `DFTTrainer`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import sys
import threading
from pathlib import Path

from transformers import TrainerCallback

from dftlite.config import ConfigError
from dftlite.outputs import disk_full_error, make_dir, write_tensors_atomic, write_text_atomic

DFT_STATE, DFT_STATE_META = "dft_state.safetensors", "dft_state.json"  # a checkpoint's u table and draw state
TRAINER_STATE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME: written last, marks a checkpoint whole
CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
STATE_FORMAT_VERSION = 1  # of dft_state.*
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME, in every checkpoint


def is_complete_checkpoint(directory) -> bool:
    """Whether a checkpoint was saved to the end: its trainer_state.json, written last, parses. A kill or
    a full disk during the save leaves a directory without it (or with half of it)."""
    directory = Path(directory)
    if not ((directory / DFT_STATE).is_file() and (directory / DFT_STATE_META).is_file()):
        return False
    try:
        json.loads((directory / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir) -> str | None:
    """The complete checkpoint-N of output_dir with the highest N, or None."""
    prefix = f"{CHECKPOINT_PREFIX}-"
    steps = sorted((int(p.name[len(prefix):]), p) for p in Path(output_dir).glob(f"{prefix}*") if p.name[len(prefix):].isdigit())
    return next((str(path) for _, path in reversed(steps) if is_complete_checkpoint(path)), None)


def incomplete_checkpoint_message(checkpoint: str | Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, and which checkpoint can; None when it is complete."""
    if is_complete_checkpoint(checkpoint):
        return None
    last = last_complete_checkpoint(Path(checkpoint).parent)
    return (f"{checkpoint} is an incomplete checkpoint (the run stopped while saving it, or it is not a "
            f"`dftlite train` checkpoint). Resume from {last or 'the start: there is no complete checkpoint'}"
            + (" (--resume_from_checkpoint last)" if last else ""))


def resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | Path) -> str | None:
    """The checkpoint to resume from: as given, or for 'last' the newest complete one in output_dir."""
    if resume_from_checkpoint != "last":
        return resume_from_checkpoint
    last = last_complete_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if last is None:
        raise ConfigError(f"resume_from_checkpoint: last, but {output_dir} holds no complete checkpoint")
    return last


def dft_state_meta(method: str, example_ids: list[str], seed: int, num_negatives_per_step: int) -> dict:
    """What a DFT state is valid for: `load_dft_state` refuses one saved with other values."""
    return {
        "format_version": STATE_FORMAT_VERSION, "method": method, "num_examples": len(example_ids),
        "example_ids_digest": hashlib.sha256("\n".join(example_ids).encode()).hexdigest()[:16],
        "seed": seed, "num_negatives_per_step": num_negatives_per_step,
    }


def save_dft_state(directory: str | Path, log_u, draws, meta: dict):
    """dft_state.safetensors (the u table `log_u`, a LogUTable: log_u, visits; the draw counts of `draws`, a
    NegativeDraws: draws_taken) + dft_state.json (`meta`, what the state is valid for), each whole."""
    directory = make_dir(directory, "checkpoint directory")
    write_tensors_atomic(directory / DFT_STATE, {**log_u.state_dict(), **draws.state_dict()})
    write_text_atomic(directory / DFT_STATE_META, json.dumps(meta, indent=2) + "\n")


def load_dft_state(directory: str | Path, log_u, draws, expected_meta: dict):
    """Load `save_dft_state`'s state into `log_u` and `draws`; ValueError when its meta differs from
    `expected_meta`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / DFT_STATE).is_file() or not (directory / DFT_STATE_META).is_file():
        raise FileNotFoundError(f"{directory} has no {DFT_STATE}/{DFT_STATE_META}: not a `dftlite train` checkpoint")
    saved = json.loads((directory / DFT_STATE_META).read_text())
    diffs = [f"{k} (checkpoint: {saved.get(k)!r}, now: {v!r})" for k, v in expected_meta.items() if saved.get(k) != v]
    if diffs:
        raise ValueError(f"cannot resume from {directory}: it was made with other settings: " + "; ".join(diffs))
    tensors = load_file(str(directory / DFT_STATE))
    log_u.load_state_dict({"log_u": tensors["log_u"], "visits": tensors["visits"]})
    draws.load_state_dict({"draws_taken": tensors["draws_taken"]})


def load_sharded_adapter(model, checkpoint: str | Path):
    """Load `checkpoint`'s adapter_model.safetensors into `model`, a PEFT model sharded by FSDP2, each process
    its own shards of each tensor (torch's `set_model_state_dict` slices the whole tensors).

    PEFT's file drops the adapter's name from each key (`...q_proj.lora_A.weight`); the model's parameters
    carry it (`...q_proj.lora_A.default.weight`). Every trainable parameter must be in the file, and nothing else."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    path = Path(checkpoint) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {ADAPTER_WEIGHTS}: not a `dftlite train` checkpoint")
    saved = load_file(str(path))
    tag = f".{model.active_adapter}"
    names = {name.replace(tag, ""): name for name, param in model.named_parameters() if param.requires_grad}
    if set(saved) != set(names):
        missing, unexpected = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
        raise ValueError(f"cannot resume from {checkpoint}: its {ADAPTER_WEIGHTS} is not this model's adapter "
                         f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    set_model_state_dict(model, {names[key]: tensor for key, tensor in saved.items()},
                         options=StateDictOptions(full_state_dict=True, strict=False))


@contextlib.contextmanager
def checkpoint_guard(checkpoint: str | Path, owner: bool):
    """Around a checkpoint save: whatever stops it (a full disk, a second Ctrl-C), leave no checkpoint that
    looks resumable, and report a full disk as such. owner: this process writes the checkpoint."""
    try:
        yield
    except BaseException as err:
        if owner and not is_complete_checkpoint(checkpoint):
            shutil.rmtree(checkpoint, ignore_errors=True)
        full = disk_full_error(err, checkpoint, "checkpoint") if isinstance(err, Exception) else None
        if full is not None:
            raise full from err
        raise


class SaveOnInterrupt(TrainerCallback):
    """Ctrl-C: finish the current step, save a checkpoint, stop. A second Ctrl-C aborts at once.

    With several processes the signal may reach only some of them, or reach them in different
    steps; each step's all-gather (`DFTTrainer._sync_state`) sets `agreed` on every process, and
    all act on that, so they stop at the same step instead of leaving the others in a collective."""

    def __init__(self):
        self.requested, self.stopped_at, self._previous, self._installed = False, None, None, False
        self.agreed = None  # None: one process, act on `requested`

    def __enter__(self):  # for the run: the handler in place, the previous one restored after
        self.install()
        return self

    def __exit__(self, *exc):
        self.uninstall()

    def install(self):
        self.requested, self.stopped_at, self.agreed = False, None, None
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True

    def uninstall(self):
        if self._installed:
            self._restore()
            self._installed = False

    def _restore(self):
        # getsignal gives None for a handler not set from Python: fall back to the default
        signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)

    def _handle(self, signum, frame):
        self.requested = True
        self._restore()  # the next Ctrl-C is the ordinary one
        sys.stderr.write("\nInterrupt: saving a checkpoint after this step, then stopping (Ctrl-C again to abort now)\n")

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested if self.agreed is None else self.agreed
        if requested and self.stopped_at is None:
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step
        return control
