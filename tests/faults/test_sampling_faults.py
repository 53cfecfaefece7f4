"""Sampling under faults: kill -9 of a real `dftlite sample` process, and a full disk.

Whatever happens, the pool holds only complete records, none twice, and rerunning completes it to
exactly the pool of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import signal
from pathlib import Path

import pytest
from conftest import write_jsonl

from dftlite import outputs
from dftlite.data import DataConfig
from dftlite.models import load_model
from dftlite.pool import POOL_FILE, load_pool
from dftlite.sampling import SampleConfig, sample_pool
from faults.common import (
    HUB_TOKEN,
    MODEL_SETTINGS,
    files_containing,
    flags,
    model_config,
    signal_when,
    small_tmpfs,
    start_cli,
)

PAIRS = [(a, b) for a in range(1, 5) for b in range(1, 5)]  # 16 prompts
SETTINGS = dict(num_negatives=6, max_new_tokens=6, batch_size=1)  # 96 records, one generate call each: time to kill


@pytest.fixture(scope="module")
def job(tiny_model_dir, tmp_path_factory):
    """Data, the loaded model, and the records of an uninterrupted run."""
    root = tmp_path_factory.mktemp("sampling-faults")
    data = write_jsonl(root / "train.jsonl", [{"id": f"p{a}-{b}", "question": f"What is {a} times {b}?",
                                               "answer": f"#### {a * b}"} for a, b in PAIRS])
    config = model_config(tiny_model_dir)
    model, tokenizer = load_model(config)
    job = {"root": root, "data": data, "model_config": config, "model": model, "tokenizer": tokenizer}
    sample(job, root / "reference")
    job["reference"] = records(root / "reference")
    return job


def sample(job, pool_dir, **overrides):
    data = DataConfig(data_path=str(job["data"]))
    config = SampleConfig(pool_dir=str(pool_dir), **{**SETTINGS, **overrides})
    return sample_pool(job["model_config"], data, config, job["model"], job["tokenizer"])


def records(pool_dir) -> dict:
    _, by_id = load_pool(pool_dir)
    return {(r["id"], r["k"]): r for rs in by_id.values() for r in rs}


def lines(pool_dir) -> list[bytes]:
    path = pool_dir / "pool.jsonl"
    return path.read_bytes().split(b"\n")[:-1] if path.exists() else []


def complete_records(pool_dir, reference) -> list[tuple]:
    """(id, k) of every complete line: each a record of the reference pool, none twice."""
    keys = [(json.loads(line)["id"], json.loads(line)["k"]) for line in lines(pool_dir)]
    assert len(keys) == len(set(keys)), "a duplicated record"
    assert all(records(pool_dir)[key] == reference[key] for key in keys)
    return keys


def assert_whole_batches_only(pool_dir, reference) -> list[tuple]:
    """As complete_records, and no partial last line either."""
    data = (pool_dir / "pool.jsonl").read_bytes()
    assert data == b"" or data.endswith(b"\n"), "a partial last line"
    return complete_records(pool_dir, reference)


def test_kill_9_then_rerun_completes_the_pool_exactly(job, tmp_path):
    pool_dir, total = tmp_path / "pool", len(job["reference"])
    args = ["sample", *flags({"model_name_or_path": job["model_config"].model_name_or_path, **MODEL_SETTINGS,
                              "data_path": job["data"], "pool_dir": pool_dir, **SETTINGS})]
    process = start_cli(args, tmp_path, "sample")
    signal_when(process, lambda: len(lines(pool_dir)) >= 10, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    kept = complete_records(pool_dir, job["reference"])
    assert 10 <= len(kept) < total, "killed too late: nothing left to resume"

    # a kill in the middle of a write leaves the first bytes of a batch; if this one did not, add them
    if (pool_dir / "pool.jsonl").read_bytes().endswith(b"\n"):
        missing = next(key for key in job["reference"] if key not in kept)
        whole_line = json.dumps(job["reference"][missing], ensure_ascii=False).encode()
        with open(pool_dir / "pool.jsonl", "ab") as handle:
            handle.write(whole_line[: len(whole_line) // 2])
    assert set(records(pool_dir)) == set(kept)  # readers skip the partial line

    stats = sample(job, pool_dir)
    assert stats.new_records == total - len(kept) and stats.num_records == total
    assert sorted(assert_whole_batches_only(pool_dir, job["reference"])) == sorted(job["reference"])
    assert records(pool_dir) == job["reference"]
    assert not files_containing(HUB_TOKEN, pool_dir, tmp_path / "sample.out", tmp_path / "sample.err")


class FillingFile:
    """A raw file on a disk with `room[0]` bytes left: a write takes what fits, then writes fail with ENOSPC."""

    def __init__(self, handle, room: list[int]):
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        if self.room[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = self.handle.write(bytes(data[: self.room[0]]))
        self.room[0] -= written
        return written

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


@pytest.mark.parametrize("disk", ["failing writes", "tmpfs"])
def test_full_disk_leaves_whole_batches_and_resumes(job, tmp_path, monkeypatch, disk):
    total, reference_bytes = len(job["reference"]), (job["root"] / "reference" / "pool.jsonl").stat().st_size
    with contextlib.ExitStack() as stack:
        if disk == "tmpfs":  # a real ENOSPC: meta.json and the config take a page each, the pool about half its size
            pool_dir = stack.enter_context(small_tmpfs(tmp_path / "small", f"{8 + reference_bytes // 2048}k")) / "pool"
        else:  # room for about half the pool: whole batches, then part of one, then nothing
            pool_dir, room = tmp_path / "pool", [reference_bytes // 2]

            def filling_open(path, mode="r", *args, **kwargs):
                handle = open(path, mode, *args, **kwargs)
                return FillingFile(handle, room) if Path(path).name == POOL_FILE and "a" in mode else handle

            monkeypatch.setattr(outputs, "open", filling_open, raising=False)  # the pool's appends are outputs.append_lines
        with pytest.raises(OSError) as error:
            sample(job, pool_dir)
        assert error.value.errno == errno.ENOSPC
        assert str(pool_dir / "pool.jsonl") in str(error.value) and "rerunning" in str(error.value)
        assert json.loads((pool_dir / "meta.json").read_text())["num_negatives"] == SETTINGS["num_negatives"]
        assert sorted(p.name for p in pool_dir.iterdir()) == ["dftlite_config.yaml", "meta.json", "pool.jsonl"]
        kept = assert_whole_batches_only(pool_dir, job["reference"])  # the part-written batch was cut back
        assert total // 3 < len(kept) < total
        roomy = shutil.copytree(pool_dir, tmp_path / "roomy")
    monkeypatch.undo()
    stats = sample(job, roomy)  # space again: the rerun completes the pool
    assert stats.new_records == total - len(kept)
    assert records(roomy) == job["reference"]
    assert_whole_batches_only(roomy, job["reference"])

