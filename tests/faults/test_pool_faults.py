"""A negative pool made by another model or tokenizer is refused by every command that reads it:
`train`, `eval`, and `sample` (resuming into it), and the pool is left as it was.

"Another model" includes one stored under the same directory name (a fine-tune saved over the same
layout, another seed): the pool's fingerprint holds a digest of the weight files, not only the name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import make_tiny_model_dir

from dftlite.data import DataConfig
from dftlite.evaluate import EvalConfig, evaluate
from dftlite.models import load_model
from dftlite.pool import PoolMismatchError
from dftlite.sampling import SampleConfig, sample_pool
from dftlite.trainer import build_trainer
from faults.common import POOL_SETTINGS, dft_config, model_config


def same_name_other_weights(ws, root):
    return make_tiny_model_dir(root / "elsewhere" / Path(ws["model_dir"]).name, seed=1)


def other_name_other_weights(ws, root):
    return make_tiny_model_dir(root / "another-model", seed=1)


def other_tokenizer(ws, root):
    from transformers import AutoTokenizer

    target = shutil.copytree(ws["model_dir"], root / "retokenized" / Path(ws["model_dir"]).name)
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.add_tokens(["<|tool|>"])
    tokenizer.save_pretrained(target)
    return target


CASES = {same_name_other_weights: "fingerprint.weights_digest", other_name_other_weights: "fingerprint.model",
         other_tokenizer: "fingerprint.tokenizer_digest"}


@pytest.fixture(scope="module", params=list(CASES), ids=lambda make: make.__name__)
def foreign(request, workspace, tmp_path_factory):
    """(model config, model, tokenizer, expected difference) of a model the pool was not made with."""
    config = model_config(request.param(workspace, tmp_path_factory.mktemp("foreign")))
    model, tokenizer = load_model(config)
    return config, model, tokenizer, CASES[request.param]


def pool_bytes(ws) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(ws["pool"]).iterdir())}


@pytest.mark.parametrize("command", ["train", "eval", "sample"])
def test_pool_of_another_model_or_tokenizer_is_refused(workspace, foreign, tmp_path, command):
    config, model, tokenizer, difference = foreign
    data = DataConfig(data_path=workspace["train"])
    before = pool_bytes(workspace)
    with pytest.raises(PoolMismatchError, match=difference):
        if command == "train":
            build_trainer(config, data, dft_config(workspace, tmp_path / "run"), model, tokenizer)
        elif command == "eval":
            evaluate(config, data, EvalConfig(pool_dir=workspace["pool"], max_new_tokens=4), model, tokenizer)
        else:
            sample_pool(config, data, SampleConfig(pool_dir=workspace["pool"], **POOL_SETTINGS), model, tokenizer)
    assert pool_bytes(workspace) == before
