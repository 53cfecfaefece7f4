"""dftlite.draws: a split's pool negatives (load_split's checks, through build_trainer on test_trainer.py's
workspace) and the micro-batches of a step. That each epoch draws fresh negatives is tested on a real
run in tests/test_trainer.py."""

from __future__ import annotations

import pytest
from conftest import write_jsonl
from test_trainer import TRAIN_PAIRS, _config, _data, _model_config, _rows, workspace  # noqa: F401  (a fixture)

from dftlite.data import DataConfig, DataError
from dftlite.draws import Group, micro_batches
from dftlite.pool import PoolMismatchError
from dftlite.trainer import build_trainer


def test_micro_batches_keep_groups_whole():
    groups = [Group(str(i), [1] * 5, [[2] * length] * 3, []) for i, length in enumerate([10, 2, 30, 4])]
    batches = micro_batches(groups, token_budget=60)
    assert sorted(g for batch in batches for g in batch) == [0, 1, 2, 3]
    for batch in batches:  # within budget, except a group that alone exceeds it
        assert len(batch) == 1 or 3 * len(batch) * max(groups[g].longest for g in batch) <= 60
    assert micro_batches(groups, token_budget=0) == [[0, 1, 2, 3]]


def test_draw_and_pool_errors(workspace, tmp_path):
    ws, model_config = workspace, _model_config(workspace["model_dir"])
    with pytest.raises(DataError, match=r"fewer than 10 .*allow_negative_reuse"):
        build_trainer(model_config, _data(ws), _config(ws, tmp_path, num_train_epochs=5))
    new_row = {"id": "new-1", "prompt": "What is 0 + 0?", "completion": "0"}
    extra = write_jsonl(tmp_path / "extra.jsonl", _rows(TRAIN_PAIRS) + [new_row])
    with pytest.raises(DataError, match="no negatives for 1 training example.*'new-1'"):
        build_trainer(model_config, _data(ws, str(extra)), _config(ws, tmp_path))
    with pytest.raises(DataError, match="score_train_prompt: true"):  # the eval pool was sampled without it
        config = _config(ws, tmp_path, method="dft", reference="train_prompt", pool_dir=ws["eval_pool"])
        build_trainer(model_config, _data(ws, ws["eval"]), config)
    with pytest.raises(FileNotFoundError, match="dftlite sample"):
        build_trainer(model_config, _data(ws), _config(ws, tmp_path, pool_dir=str(tmp_path / "nowhere")))
    with pytest.raises(PoolMismatchError, match="template"):
        build_trainer(model_config, DataConfig(data_path=ws["train"], template="plain"), _config(ws, tmp_path))
