"""Fixtures of the fault suite: training data, its negative pool, and an uninterrupted reference run
with a checkpoint after every step, which killed, interrupted and poisoned runs are compared with."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from dftlite.models import load_model
from dftlite.sampling import SampleConfig, sample_pool
from dftlite.trainer import train
from faults.common import POOL_SETTINGS, TRAIN_PAIRS, data_config, dft_config, model_config, rows


@pytest.fixture(scope="package")
def workspace(tiny_model_dir, tmp_path_factory) -> dict:
    """8 training pairs and their pool (4 negatives each: B=2 for 2 epochs), from the tiny model."""
    root = tmp_path_factory.mktemp("faults")
    train_path = write_jsonl(root / "train.jsonl", rows(TRAIN_PAIRS))
    ws = {"root": root, "model_dir": str(tiny_model_dir), "train": str(train_path), "pool": str(root / "pool")}
    model, tokenizer = load_model(model_config(tiny_model_dir))
    sample_pool(model_config(tiny_model_dir), data_config(ws), SampleConfig(pool_dir=ws["pool"], **POOL_SETTINGS),
                model, tokenizer)
    return ws


@pytest.fixture(scope="package")
def reference_run(workspace):
    """The uninterrupted run: 16 steps, checkpoint-1 ... checkpoint-16, then adapter/ and dft_state.*."""
    output_dir = workspace["root"] / "reference"
    train(model_config(workspace["model_dir"]), data_config(workspace), dft_config(workspace, output_dir))
    return output_dir
