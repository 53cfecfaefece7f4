"""Keeping outputs whole: what `sample`, `train`, `eval` and `export` use to write their results.

Every output of dftlite is either complete or absent, and only one run writes it at a time:

- `output_lock(directory, what)`: an exclusive lock on an output (a pool_dir, an output_dir, an
  export_dir). A second run on it stops at once with one line naming the process that holds it.
  The lock is the kernel's (`flock`), so a run killed with kill -9 holds nothing: its lock file is
  left behind, and the next run takes it over.
- `write_text_atomic`, `write_tensors_atomic`, `staged_directory`: a file or a directory appears
  whole, by a rename, or not at all.
- `append_lines`, `cut_partial_line`, `complete_lines`: an append-only JSONL file (the negative
  pool) that a kill leaves with at most a partial last line, and a failed write leaves as it was.
- `disk_full_error`, `disk_full_guard`: a full disk is an OSError(ENOSPC) that names what could
  not be written, whatever library's error type reported it.

Training checkpoints are `dftlite.checkpoints`. Nothing here knows about models, losses or
configs; it imports no other dftlite module.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

LOCK_FILE = ".dftlite.lock"  # .<name>.dftlite.lock next to the locked directory
NEARLY_FULL = 1 << 20  # bytes: a write that failed with less than this free is put down to a full disk


class OutputInUseError(OSError):
    """Another live process holds the lock of an output directory. One argument: str() is the message."""


# ---------------------------------------------------------------------------------------------
# One writer per output.


def _holder(path: Path) -> str:
    """Who holds a lock, from what its holder wrote into the lock file."""
    try:
        info = json.loads(path.read_text())
        return f"process {info['pid']} on {info['host']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):  # written a moment from now, or by an older dftlite
        return "another process"


def _lock_error(err: OSError, path: Path) -> OSError:
    return OSError(err.errno, f"{err.strerror}: cannot create the lock file {path}")


def lock_path(directory: str | Path) -> Path:
    """The lock file of an output directory: a sibling, so that it is never part of the output (an
    export_dir is replaced by a rename, a pool_dir is listed and copied)."""
    directory = Path(directory)
    return directory.parent / f".{directory.name}{LOCK_FILE}"


@contextlib.contextmanager
def output_lock(directory: str | Path, what: str):
    """Hold an exclusive lock on the output `directory` for the duration; raise OutputInUseError at once
    when another process holds it.

    `what` names the output in the error ("pool_dir", "output_dir", ...). The lock file
    (`lock_path`) is removed on release; one left by a killed process is locked by nobody and is
    taken over. The directory's parent is created if needed; the directory itself need not exist.
    """
    directory = Path(directory)
    path = lock_path(make_dir(directory.parent, f"parent directory of {what}") / directory.name)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise _lock_error(err, path) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputInUseError(
                f"{what} {directory} is in use by {_holder(path)}; wait for that run to finish, or stop it, "
                f"or use another {what}"
            ) from None
        except OSError as err:  # a file system without locks
            os.close(fd)
            raise _lock_error(err, path) from err
        # the holder before us may have removed the file between our open and our flock: lock the file
        # that is at `path` now, or two runs would each hold a lock on a different file
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": f"dftlite {sys.argv[1]}" if len(sys.argv) > 1 and "dftlite" in sys.argv[0] else "python"}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError as err:
        os.close(fd)
        raise _lock_error(err, path) from err
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: a waiting opener then sees another inode, and retries
        os.close(fd)


def check_not_being_written(directory: str | Path, what: str):
    """Raise OutputInUseError when a live process holds `directory`'s lock: a reader (train, eval)
    would see a pool that is still growing."""
    path = lock_path(directory)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody writes
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputInUseError(
            f"{what} {directory} is being written by {_holder(path)}; wait for that run to finish"
        ) from None
    except OSError:
        return
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Whole files and directories.


def make_dir(path: str | Path, what: str) -> Path:
    """`mkdir -p path`; an OSError says which output directory could not be made, and why."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a directory" if blocker is not None else err.strerror
        raise OSError(err.errno, f"cannot create the {what} {path}: {reason}") from err
    return path


def _temporary_sibling(path: Path) -> Path:
    """A name next to `path` that no other writer uses: two runs writing the same file (two evals with one
    json_path) each rename a whole file of their own, and the last one wins."""
    return path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def write_text_atomic(path: str | Path, text: str):
    """Write a temporary sibling, then rename it over `path`: readers see the old file or the new one,
    never half of one. A failed write (a full disk) leaves no temporary file, and its error names `path`."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(err.errno, f"{err.strerror}: cannot write {path}") from err
    finally:
        tmp.unlink(missing_ok=True)


def write_tensors_atomic(path: str | Path, tensors: dict):
    """safetensors `save_file` to a temporary sibling, then a rename: the file is whole or absent."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_directory(target: str | Path, owner: bool = True):
    """Yield an empty sibling `.<name>.tmp` of `target` to write into; on success it replaces `target` by
    a rename (the old one is removed first), so `target` is never half-written. On an error it is removed
    and `target` is left as it was. The caller holds the output's lock (the name is fixed, so that every
    process of a multi-process run writes to the same path); owner=False (a process that does not save):
    yield the path, touch nothing."""
    target = Path(target)
    staging = target.parent / f".{target.name}.tmp"
    if not owner:
        yield staging
        return
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    staging.mkdir(parents=True)
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def disk_full_error(err: BaseException, path: str | Path, what: str) -> OSError | None:
    """An OSError(ENOSPC) saying that `what` could not be written to `path` because the disk is full, or
    None when `err` is something else. torch's zip writer, safetensors and tokenizers report a full disk
    with their own error types (torch's without the cause): for those, the free space decides."""
    if isinstance(err, OSError) and err.errno is not None:
        if err.errno != errno.ENOSPC:
            return None
    else:
        existing = next((p for p in (Path(path), *Path(path).parents) if p.exists()), Path("."))
        try:
            if shutil.disk_usage(existing).free >= NEARLY_FULL:
                return None
        except OSError:
            return None
    reason = f"{type(err).__name__}: {err}"
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: cannot write {what} {path} ({reason})")


@contextlib.contextmanager
def disk_full_guard(path: str | Path, what: str):
    """Turn any error of the block that a full disk caused into `disk_full_error`'s OSError."""
    try:
        yield
    except Exception as err:
        full = disk_full_error(err, path, what)
        if full is not None:
            raise full from err
        raise


# ---------------------------------------------------------------------------------------------
# Append-only JSONL (the negative pool).


def complete_lines(path: str | Path) -> list[bytes]:
    """The lines of `path` that end in a newline, without it; a partial last line (a write cut short
    by a kill) is not among them. A missing file has none."""
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    return data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]


def cut_partial_line(path: str | Path) -> int:
    """Cut a last line without a newline (a crash mid-write); return the bytes removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "r+b") as handle:
        size = end = handle.seek(0, os.SEEK_END)
        keep = 0
        while end > 0:  # scan back from the end in 64 KiB blocks for the last newline
            start = max(0, end - (1 << 16))
            handle.seek(start)
            newline = handle.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        if keep < size:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
    return size - keep


def append_lines(path: str | Path, payload: bytes, what: str):
    """Append `payload` (whole lines), then fsync: a kill leaves at most a partial last line.

    A failed write (a full disk, a quota) is undone: the file is cut back to where this payload began,
    and the error names `what` and `path`."""
    with open(path, "ab", buffering=0) as handle:  # unbuffered: nothing is left to flush at close after an error
        start = handle.seek(0, os.SEEK_END)
        try:
            view = memoryview(payload)
            while view:  # a raw write may take only part of the payload
                view = view[handle.write(view):]
            os.fsync(handle.fileno())
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(handle.fileno(), start)
            raise OSError(err.errno, f"{err.strerror} while appending {what} to {path}") from err


def move_tail_aside(path: str | Path, offset: int) -> Path:
    """Move the bytes of `path` from `offset` on into a new file `<path>.bad-<time>` (written and fsynced
    before `path` is cut), and return that file: a repair keeps every byte it does not keep in place."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}")
    number = 1
    while aside.exists():
        number += 1
        aside = aside.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}-{number}")
    with open(path, "r+b") as source:
        source.seek(offset)
        with open(aside, "xb") as target:
            shutil.copyfileobj(source, target)
            target.flush()
            os.fsync(target.fileno())
        source.truncate(offset)
        source.flush()
        os.fsync(source.fileno())
    return aside
