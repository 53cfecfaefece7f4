"""dftlite.outputs on its own: the lock, whole files and directories, append-only lines. The fault suite
(tests/faults) checks the same guarantees through real `dftlite` processes."""

from __future__ import annotations

import json
import os

import pytest

from dftlite.outputs import (OutputInUseError, append_lines, check_not_being_written, complete_lines, cut_partial_line,
                             lock_path, move_tail_aside, output_lock, staged_directory, write_text_atomic)


def test_a_second_lock_is_refused_and_names_the_holder(tmp_path):
    target = tmp_path / "pool"
    with output_lock(target, "pool_dir") as path:
        assert path == tmp_path / ".pool.dftlite.lock" == lock_path(target)
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(OutputInUseError) as error:  # flock: a second open file conflicts, even in one process
            with output_lock(target, "pool_dir"):
                pass
        assert str(error.value).startswith(f"pool_dir {target} is in use by process {os.getpid()} on ")
        with pytest.raises(OutputInUseError, match="is being written by process"):
            check_not_being_written(target, "pool_dir")
    assert not lock_path(target).exists()
    check_not_being_written(target, "pool_dir")  # released: readers go on
    with output_lock(target, "pool_dir"):  # and the next writer too
        pass


def test_a_lock_file_that_nobody_holds_is_taken_over(tmp_path):
    target = tmp_path / "run"
    lock_path(target).write_text(json.dumps({"pid": 999999, "host": "gone", "command": "dftlite train", "since": "-"}))
    with output_lock(target, "output_dir") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_the_lock_creates_only_the_parent(tmp_path):
    with output_lock(tmp_path / "a" / "b" / "export", "export_dir"):
        assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == [".export.dftlite.lock"]
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == []


def test_a_staged_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError), staged_directory(target) as staging:
        (staging / "new").write_text("half")
        raise RuntimeError("killed mid-save")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"] and (target / "old").read_text() == "old"
    with staged_directory(target) as staging:
        (staging / "new").write_text("whole")
    assert sorted(p.name for p in target.iterdir()) == ["new"] and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_write_text_atomic_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "eval.json"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_append_only_lines(tmp_path):
    path = tmp_path / "pool.jsonl"
    append_lines(path, b"a\nbb\n", "two lines")
    with open(path, "ab") as handle:
        handle.write(b"cc")  # a write cut short
    assert complete_lines(path) == [b"a", b"bb"]
    assert cut_partial_line(path) == 2 and path.read_bytes() == b"a\nbb\n"
    aside = move_tail_aside(path, 2)  # from line 2 on
    assert path.read_bytes() == b"a\n" and aside.read_bytes() == b"bb\n" and aside.name.startswith("pool.jsonl.bad-")
