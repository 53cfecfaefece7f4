"""`dftlite eval` and `dftlite export` on a full disk or into an unwritable directory: a clear error
that names the path, and no half-written file left behind (the old file, or nothing)."""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path

import pytest

from dftlite import export as export_module
from dftlite.cli import main
from dftlite.evaluate import EvalConfig, evaluate
from dftlite.export import ExportConfig, export
from faults.common import MODEL_SETTINGS, data_config, flags, model_config, small_tmpfs


@contextlib.contextmanager
def full_disk(disk: str, root: Path, monkeypatch, fail):
    """A directory whose disk is full: a real tmpfs of 64k, or `fail(monkeypatch)` making writes raise ENOSPC."""
    if disk == "tmpfs":
        with small_tmpfs(root / "small", "64k") as mounted:
            yield mounted
    else:
        fail(monkeypatch)
        yield root
        monkeypatch.undo()


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("disk", ["failing writes", "tmpfs"])
def test_export_to_a_full_disk_leaves_nothing(workspace, reference_run, tmp_path, monkeypatch, disk):
    def fail(patch):
        patch.setattr(export_module.shutil, "copyfile", no_space)

    with full_disk(disk, tmp_path, monkeypatch, fail) as root:
        export_dir = root / "export"
        config = ExportConfig(adapter_path=str(reference_run / "adapter"), export_dir=str(export_dir), merge=True,
                              merge_dtype="fp32")  # the merged weights do not fit in 64k
        with pytest.raises(OSError) as error:
            export(model_config(workspace["model_dir"]), config)
        assert error.value.errno == errno.ENOSPC and str(export_dir) in str(error.value)
        assert not export_dir.exists() and not list(root.glob(".export.tmp-*"))


@pytest.mark.parametrize("disk", ["failing writes", "tmpfs"])
def test_eval_json_on_a_full_disk_keeps_the_old_file(workspace, reference_run, tmp_path, monkeypatch, disk):
    def fail(patch):
        real_write_text = Path.write_text
        patch.setattr(Path, "write_text", lambda self, *a, **k: no_space() if self.name.endswith(".tmp")
                      else real_write_text(self, *a, **k))

    with full_disk(disk, tmp_path, monkeypatch, fail) as root:
        json_path = root / "eval.json"
        json_path.write_text('{"old": true}\n')
        if disk == "tmpfs":  # fill the rest of the disk
            with pytest.raises(OSError), open(root / "filler", "wb") as handle:
                while True:
                    handle.write(b"\0" * 4096)
                    handle.flush()
        config = EvalConfig(adapter_path=str(reference_run / "adapter"), json_path=str(json_path), max_new_tokens=4,
                            compare_base=False)
        with pytest.raises(OSError) as error:
            evaluate(model_config(workspace["model_dir"]), data_config(workspace), config)
        assert error.value.errno == errno.ENOSPC and str(json_path) in str(error.value)
        assert json_path.read_text() == '{"old": true}\n'
        assert sorted(p.name for p in root.iterdir()) in (["eval.json"], ["eval.json", "filler"])


@pytest.mark.parametrize("where", ["under a file", "read-only disk"])
@pytest.mark.parametrize("command", ["sample", "train", "eval", "export"])
def test_unwritable_output_is_a_clear_error(workspace, reference_run, tmp_path, capsys, command, where):
    with contextlib.ExitStack() as stack:
        if where == "under a file":  # root writes anywhere chmod allows nothing; a file in the path stops everyone
            parent = tmp_path / "a-file"
            parent.write_text("not a directory")
            reasons = ("is a file, not a directory", "Not a directory")
        else:
            parent = stack.enter_context(small_tmpfs(tmp_path / "read-only", "64k", read_only=True))
            reasons = ("Read-only file system",)
        model = {"model_name_or_path": workspace["model_dir"], **MODEL_SETTINGS}
        target, args = {
            "sample": lambda t: (t, {**model, "data_path": workspace["train"], "pool_dir": t, "max_new_tokens": 4}),
            "train": lambda t: (t, {**model, "data_path": workspace["train"], "pool_dir": workspace["pool"],
                                    "output_dir": t, "use_cpu": True}),
            "eval": lambda t: (t / "eval.json", {**model, "data_path": workspace["train"], "max_new_tokens": 4,
                                                 "adapter_path": reference_run / "adapter",
                                                 "json_path": t / "eval.json"}),
            "export": lambda t: (t, {**model, "adapter_path": reference_run / "adapter", "export_dir": t}),
        }[command](parent / "out")
        assert main([command, *flags(args)]) == 1
        err = capsys.readouterr().err
        assert f"dftlite {command}: error: " in err and str(parent) in err and "Traceback" not in err, err
        assert any(reason in err for reason in reasons), err
        assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file" if where == "under a file" else "read-only"]
