"""Two runs on one output: the second stops at once, in one line that names the output and the process
holding it, and the first finishes with a valid, complete output. A lock left by a run killed with
kill -9 does not block the next run.

The runs are real `dftlite` processes where it matters (two samplers, kill -9); the lock of a train
output_dir and of an export_dir is held in-process, which conflicts the same way (`flock` locks an
open file, not a process).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from conftest import write_jsonl

from dftlite.cli import main
from dftlite.data import DataConfig
from dftlite.export import ExportConfig, export
from dftlite.outputs import OutputInUseError, lock_path, output_lock
from dftlite.pool import load_pool
from dftlite.sampling import SampleConfig, sample_pool
from dftlite.trainer import train
from faults.common import MODEL_SETTINGS, dft_config, flags, log_text, model_config, signal_when, start_cli

PROMPTS, NEGATIVES = 12, 4
SETTINGS = dict(num_negatives=NEGATIVES, max_new_tokens=6, batch_size=1)  # one record per append: a run is caught mid-way


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("locks")
    return write_jsonl(root / "train.jsonl", [{"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}
                                               for i in range(PROMPTS)])


def sample_args(tiny_model_dir, data, pool_dir) -> list[str]:
    return ["sample", *flags({"model_name_or_path": tiny_model_dir, **MODEL_SETTINGS, "data_path": data,
                              "pool_dir": pool_dir, **SETTINGS})]


def lines(pool_dir) -> int:
    path = pool_dir / "pool.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def pause_when(process: subprocess.Popen, ready, timeout: float = 120.0):
    """SIGSTOP `process` as soon as `ready()` holds; fail if it ended or hung before."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before it could be paused"
        assert time.monotonic() < deadline, "no progress before the timeout"
        time.sleep(0.01)
    process.send_signal(signal.SIGSTOP)


def assert_valid_and_complete(pool_dir):
    """Every (id, k) once, each a whole record; nothing else in the pool."""
    _, by_id = load_pool(pool_dir)  # raises on a corrupt or duplicated line
    keys = sorted((r["id"], r["k"]) for records in by_id.values() for r in records)
    assert keys == sorted((f"q{i}", k) for i in range(PROMPTS) for k in range(NEGATIVES))
    assert lines(pool_dir) == PROMPTS * NEGATIVES
    assert (pool_dir / "pool.jsonl").read_bytes().endswith(b"\n")


def test_a_second_sampler_on_the_same_pool_stops_at_once_and_the_pool_stays_whole(tiny_model_dir, data, tmp_path):
    pool_dir = tmp_path / "pool"
    first = start_cli(sample_args(tiny_model_dir, data, pool_dir), tmp_path, "first")
    # pause the first run while it holds the lock, part-way through: the second certainly meets it
    try:
        pause_when(first, lambda: lines(pool_dir) >= 3)
        written = lines(pool_dir)
        assert written < PROMPTS * NEGATIVES, "the first run finished before it could be paused"
        second = start_cli(sample_args(tiny_model_dir, data, pool_dir), tmp_path, "second")
        assert second.wait(timeout=300) == 1
        assert lines(pool_dir) == written, "the second run wrote into the pool"
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, log_text(tmp_path, "first")

    err = log_text(tmp_path, "second").strip()
    assert err.count("\n") == 0, f"not one line:\n{err}"
    assert err.startswith(f"dftlite sample: error: pool_dir {pool_dir} is in use by process {first.pid} ")
    assert "dftlite sample" in err.removeprefix("dftlite sample: error:") and "Traceback" not in err
    assert_valid_and_complete(pool_dir)
    assert not lock_path(pool_dir).exists(), "the lock file outlived the run"


def test_a_lock_left_by_kill_9_is_taken_over(tiny_model_dir, data, tmp_path):
    pool_dir = tmp_path / "pool"
    process = start_cli(sample_args(tiny_model_dir, data, pool_dir), tmp_path, "killed")
    signal_when(process, lambda: lines(pool_dir) >= 3, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    left = lock_path(pool_dir)
    assert json.loads(left.read_text())["pid"] == process.pid, "kill -9 should leave the lock file behind"

    model = model_config(tiny_model_dir)  # the rerun is in-process: what matters is the file left behind
    stats = sample_pool(model, DataConfig(data_path=str(data)), SampleConfig(pool_dir=str(pool_dir), **SETTINGS))
    assert 0 < stats.new_records < PROMPTS * NEGATIVES
    assert_valid_and_complete(pool_dir)
    assert not left.exists()


def test_train_refuses_an_output_dir_in_use(workspace, tmp_path, capsys):
    output_dir = tmp_path / "run"
    with output_lock(output_dir, "output_dir"):
        with pytest.raises(OutputInUseError, match=f"output_dir {output_dir} is in use by process "):
            train(model_config(workspace["model_dir"]), DataConfig(data_path=workspace["train"]),
                  dft_config(workspace, output_dir, max_steps=1))
        args = flags({"model_name_or_path": workspace["model_dir"], **MODEL_SETTINGS, "data_path": workspace["train"],
                      "pool_dir": workspace["pool"], "output_dir": output_dir, "use_cpu": True, "max_steps": 1})
        assert main(["train", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dftlite train: error: output_dir {output_dir} is in use") and "\n" not in err, err
    assert not output_dir.exists(), "nothing is written into an output_dir another run holds"


def test_export_refuses_an_export_dir_in_use(reference_run, workspace, tmp_path):
    export_dir = tmp_path / "export"
    config = ExportConfig(adapter_path=str(reference_run / "adapter"), export_dir=str(export_dir))
    with output_lock(export_dir, "export_dir"):
        with pytest.raises(OutputInUseError, match=f"export_dir {export_dir} is in use"):
            export(model_config(workspace["model_dir"]), config)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    export(model_config(workspace["model_dir"]), config)  # released: the export goes through
    assert (export_dir / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_train_and_eval_refuse_a_pool_that_is_still_being_written(workspace, tmp_path):
    from dftlite.evaluate import EvalConfig, evaluate

    data = DataConfig(data_path=workspace["train"])
    with output_lock(workspace["pool"], "pool_dir"):
        with pytest.raises(OutputInUseError, match="is being written by process"):
            train(model_config(workspace["model_dir"]), data, dft_config(workspace, tmp_path / "run", max_steps=1))
        with pytest.raises(OutputInUseError, match="is being written by process"):
            evaluate(model_config(workspace["model_dir"]), data, EvalConfig(pool_dir=workspace["pool"], max_new_tokens=2))
