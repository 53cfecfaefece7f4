"""dftlite.checkpoints on its own. Saving, resuming and interrupting real runs: tests/test_trainer.py and
the fault suite (tests/faults/test_training_faults.py)."""

from __future__ import annotations

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dftlite import checkpoints


def test_checkpoint_names_are_the_trainers():
    assert checkpoints.TRAINER_STATE == TRAINER_STATE_NAME and checkpoints.CHECKPOINT_PREFIX == PREFIX_CHECKPOINT_DIR
