"""A damaged negative pool: every command that reads it says in one line which file and line is bad and
how to repair it, and changes nothing; `dftlite sample --repair_pool true` keeps the valid prefix,
moves the rest aside (nothing is deleted) and resamples it, to exactly the pool of an undamaged run.
A pool that holds no record yet (a first run killed before its first write) takes the next run's
settings instead of refusing them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import write_jsonl

from dftlite.cli import main
from dftlite.data import DataConfig
from dftlite.models import load_model
from dftlite.pool import PoolMismatchError, load_pool
from dftlite.sampling import SampleConfig, sample_pool
from faults.common import MODEL_SETTINGS, flags, model_config

SETTINGS = dict(num_negatives=3, max_new_tokens=6, batch_size=1)  # batch_size=1: a resample is bit for bit the same


@pytest.fixture(scope="module")
def job(tiny_model_dir, tmp_path_factory):
    """Data, the loaded model, and an undamaged pool (6 prompts × 3 negatives)."""
    root = tmp_path_factory.mktemp("corrupt-pool")
    data = write_jsonl(root / "train.jsonl", [{"id": f"q{i}", "question": f"What is {i} * 3?", "answer": f"#### {3 * i}"}
                                              for i in range(6)])
    config = model_config(tiny_model_dir)
    model, tokenizer = load_model(config)
    job = {"root": root, "data": data, "model_config": config, "model": model, "tokenizer": tokenizer}
    sample(job, root / "good")
    job["good"] = root / "good"
    return job


def sample(job, pool_dir, **overrides):
    config = SampleConfig(pool_dir=str(pool_dir), **{**SETTINGS, **overrides})
    return sample_pool(job["model_config"], DataConfig(data_path=str(job["data"])), config, job["model"], job["tokenizer"])


def pool_lines(pool_dir) -> list[bytes]:
    return (Path(pool_dir) / "pool.jsonl").read_bytes().splitlines(keepends=True)


def cut_line_1(pool_dir):
    """Line 1 cut to 50 characters (a copy or an editor gone wrong): corrupt, and not the last line."""
    lines = pool_lines(pool_dir)
    (pool_dir / "pool.jsonl").write_bytes(lines[0][:50] + b"\n" + b"".join(lines[1:]))
    return 1


def written_twice(pool_dir):
    """Every record appended twice, as two concurrent runs did before the pool was locked."""
    lines = pool_lines(pool_dir)
    (pool_dir / "pool.jsonl").write_bytes(b"".join(lines + lines))
    return len(lines) + 1


def cut_line_4(pool_dir):
    lines = pool_lines(pool_dir)
    (pool_dir / "pool.jsonl").write_bytes(b"".join(lines[:3]) + lines[3][:40] + b"\n" + b"".join(lines[4:]))
    return 4


DAMAGES = [cut_line_1, written_twice, cut_line_4]


def error_line(capsys, command: str) -> str:
    """The one line of stderr that reports the error (progress bars of model loading may precede it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if f"dftlite {command}: error:" in line]
    return line


def damaged(job, tmp_path, damage) -> tuple[Path, int]:
    pool_dir = Path(shutil.copytree(job["good"], tmp_path / "pool"))
    return pool_dir, damage(pool_dir)


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("command", ["sample", "train", "eval"])
def test_a_damaged_pool_is_one_clean_line_per_command(job, tmp_path, capsys, command, damage):
    pool_dir, bad_line = damaged(job, tmp_path, damage)
    before = {p.name: p.read_bytes() for p in pool_dir.iterdir()}
    common = {"model_name_or_path": job["model_config"].model_name_or_path, **MODEL_SETTINGS, "data_path": job["data"]}
    args = {"sample": {**common, "pool_dir": pool_dir, **SETTINGS},
            "train": {**common, "pool_dir": pool_dir, "output_dir": tmp_path / "run", "use_cpu": True, "max_steps": 1,
                      "num_negatives_per_step": 1},
            "eval": {**common, "pool_dir": pool_dir, "max_new_tokens": 2}}[command]
    assert main([command, *flags(args)]) == 1
    err = error_line(capsys, command)
    assert err.startswith(f"dftlite {command}: error: {pool_dir / 'pool.jsonl'}:{bad_line}: "), err
    assert ("duplicate record" if damage is written_twice else "corrupt pool record") in err
    assert "--repair_pool true" in err
    assert {p.name: p.read_bytes() for p in pool_dir.iterdir()} == before, "a reader changed the pool"


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_repair_keeps_the_valid_prefix_moves_the_rest_aside_and_resamples_exactly(job, tmp_path, damage):
    pool_dir, bad_line = damaged(job, tmp_path, damage)
    damaged_bytes = (pool_dir / "pool.jsonl").read_bytes()
    prefix = b"".join(pool_lines(pool_dir)[: bad_line - 1])

    stats = sample(job, pool_dir, repair_pool=True)

    (aside,) = pool_dir.glob("pool.jsonl.bad-*")
    assert prefix + aside.read_bytes() == damaged_bytes, "every byte is kept: the prefix in place, the rest aside"
    assert (pool_dir / "pool.jsonl").read_bytes().startswith(prefix)
    good_records = load_pool(job["good"])[1]
    assert stats.new_records == sum(map(len, good_records.values())) - (bad_line - 1)
    assert load_pool(pool_dir)[1] == good_records  # seeded per (id, k): the resampled records are the same


def test_repair_of_a_whole_pool_changes_nothing(job, tmp_path):
    pool_dir = Path(shutil.copytree(job["good"], tmp_path / "pool"))
    before = (pool_dir / "pool.jsonl").read_bytes()
    assert sample(job, pool_dir, repair_pool=True).new_records == 0
    assert (pool_dir / "pool.jsonl").read_bytes() == before and not list(pool_dir.glob("pool.jsonl.bad-*"))


def test_a_corrupt_meta_json_is_one_clean_line(job, tmp_path, capsys):
    pool_dir = Path(shutil.copytree(job["good"], tmp_path / "pool"))
    (pool_dir / "meta.json").write_text('{"format_version": 1, "fingerp')
    args = {"model_name_or_path": job["model_config"].model_name_or_path, **MODEL_SETTINGS, "data_path": job["data"],
            "pool_dir": pool_dir, "max_new_tokens": 2}
    assert main(["eval", *flags(args)]) == 1
    assert error_line(capsys, "eval").startswith(f"dftlite eval: error: {pool_dir / 'meta.json'}: not a pool's settings")


def test_a_pool_without_records_takes_the_new_settings(job, tmp_path):
    pool_dir = tmp_path / "pool"
    sample(job, pool_dir, max_new_tokens=3)
    # a first run killed in its first write: meta.json with its settings, part of one line, no record
    (pool_dir / "pool.jsonl").write_bytes(pool_lines(pool_dir)[0][:30])
    stats = sample(job, pool_dir)  # other settings (max_new_tokens=6): nothing to protect, so they take over
    assert json.loads((pool_dir / "meta.json").read_text())["max_new_tokens"] == SETTINGS["max_new_tokens"]
    assert load_pool(pool_dir)[1] == load_pool(job["good"])[1] and stats.new_records == 18


def test_a_pool_with_records_still_refuses_other_settings(job, tmp_path):
    pool_dir = tmp_path / "pool"
    sample(job, pool_dir, max_new_tokens=3)
    (pool_dir / "pool.jsonl").write_bytes(pool_lines(pool_dir)[0])  # one complete record: worth protecting
    before = {p.name: p.read_bytes() for p in pool_dir.iterdir()}
    with pytest.raises(PoolMismatchError, match="max_new_tokens"):
        sample(job, pool_dir)
    assert {p.name: p.read_bytes() for p in pool_dir.iterdir()} == before
