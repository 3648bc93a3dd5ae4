"""Writing into a run folder: the one atomic write (`writing`, `write_atomic`, `save_atomic`), a
failing disk as one StoreError whichever library wrote (`disk_errors`), one writer per run folder
(`lock`, `locked_run`, and `held_by_writer` around every single write), and where a trained output
goes without overwriting another run's (`free_folder`).

Knows nothing of what is written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from itertools import takewhile
from pathlib import Path

from gemmascope.errors import StoreError
from gemmascope.runs.layout import LOCK_FILE, RUN_JSON, TMP_SUFFIX, run_of


def free_folder(base: Path, ours: Callable[[Path], bool]) -> tuple[Path, bool]:
    """Where a training run saves its output: `base`, else `base_v2`, `base_v3`, ... past folders
    other runs saved (never overwritten); True when the folder is `ours` (this very run's own save
    from before it was killed)."""
    for attempt in range(1, 1000):
        folder = base if attempt == 1 else base.with_name(f"{base.name}_v{attempt}")
        if not folder.exists():
            return folder, False
        if ours(folder):
            return folder, True
    raise StoreError(f"too many folders named like {str(base)!r}")


# ---------------------------------------------------------------------------------------------
# The one atomic write, and a failing disk as one StoreError

# How writers other than Python's own file calls report a failing disk: safetensors (Rust) names the OS
# error, torch.save's stream writer only says that a write came up short, SQLite says it in words.
_OS_ERROR = re.compile(r"os error (\d+)")
_SHORT_WRITE = re.compile(
    r"unexpected pos|file write failed|PytorchStreamWriter failed|database or disk is full|disk I/O error"
)
_LOW_SPACE = 1 << 20  # bytes: a write that fails with less than this free failed for want of space


def disk_failure(err: BaseException, path: Path | str) -> str | None:
    """Why `err`, raised while writing `path`, is a failure of the disk (full, read-only, quota,
    input/output), in words with a hint; None when it is something else (a bug, a bad value)."""
    if isinstance(err, OSError):
        code: int | None = err.errno
        why = os.strerror(err.errno) if err.errno else str(err)
    elif isinstance(err, Exception) and (found := _OS_ERROR.search(str(err))):
        code = int(found.group(1))
        why = os.strerror(code)
    elif isinstance(err, Exception) and _SHORT_WRITE.search(str(err)):
        full = _free_bytes(Path(path)) < _LOW_SPACE
        code = errno.ENOSPC if full else None
        why = os.strerror(errno.ENOSPC) if full else f"the write failed ({str(err)[:120]})"
    else:
        return None
    hint = "; free some disk space and re-run" if code in (errno.ENOSPC, errno.EDQUOT) else ""
    return why + hint


def _free_bytes(path: Path) -> int:
    """Bytes free to this user on the file system `path` (or its nearest existing folder) is on."""
    for folder in (path, *path.absolute().parents):
        try:
            st = os.statvfs(folder)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return _LOW_SPACE


@contextmanager
def disk_errors(path: Path | str, cleanup: Callable[[], object] | None = None) -> Iterator[None]:
    """Turn a failure of the disk while the block writes `path` (a file or a folder) into a
    StoreError naming it, whichever library wrote (Python, torch.save, safetensors, SQLite). On any
    failure `cleanup()` removes what the block left (after the disk was looked at: a part-written
    file still holds the space whose lack the message names)."""
    try:
        yield
    except BaseException as err:
        why = None if isinstance(err, StoreError) else disk_failure(err, path)
        if cleanup is not None:
            cleanup()
        if why is None:
            raise
        raise StoreError(f"cannot write {str(path)!r}: {why}") from err


def tmp_path(path: Path) -> Path:
    """The temporary name `path` is written under before the rename: `NAME.tmp` in the same folder
    (a writer that picks the format by suffix must be given an open file, see np.savez)."""
    return path.with_name(path.name + TMP_SUFFIX)


@contextmanager
def writing(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path for a writer that needs a path (torch.save, safetensors, np.savez);
    rename it to `path` when the block ends, or remove it when the block fails. A failure of the disk
    (full, read-only, permission), whichever library wrote, is a StoreError naming the file. A file
    of a run folder is written holding its lock (`held_by_writer`)."""
    path = Path(path)
    tmp = tmp_path(path)
    made = list(takewhile(lambda p: not p.exists(), (path.parent, *path.parent.parents)))

    def cleanup() -> None:  # the part written, and the folders made for it
        tmp.unlink(missing_ok=True)
        for folder in made:
            with suppress(OSError):
                folder.rmdir()

    with held_by_writer(path), disk_errors(path, cleanup=cleanup):
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)


def write_atomic(path: Path | str, data: bytes | str) -> Path:
    """Write `data` to `path` under a temporary name and rename it when complete: readers see the old
    file or the new one, never a part; nothing is left behind on failure."""
    path = Path(path)
    with writing(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


def save_atomic(path: Path | str, save: Callable[[Path], object]) -> Path:
    """`write_atomic` for a writer that takes a path: `save(tmp)` writes the file."""
    with writing(path) as tmp:
        save(tmp)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# One writer per run folder

_held: dict[Path, tuple[int, int]] = {}  # run folder -> (file descriptor, depth): re-entrant in a process
_held_guard = threading.Lock()  # _held is shared by the server's threads


@contextmanager
def lock(run_dir: Path | str, command: str | None = None) -> Iterator[None]:
    """Hold the run folder's writer lock (`run_dir/.lock`, an fcntl lock the OS drops when the process
    ends, even by SIGKILL). A second writer fails at once with a StoreError naming the process that
    holds it. Re-entrant within a process; under torchrun only rank 0 takes it (the ranks are one job)."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    with _held_guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
        else:
            _held[key] = (_take(run_dir, command), 1)
    try:
        yield
    finally:
        with _held_guard:
            fd, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:
                del _held[key]
                with suppress(OSError):
                    os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


def _take(run_dir: Path, command: str | None) -> int:
    """Take the lock file of `run_dir` (StoreError naming the holder when another process has it)."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise StoreError(
            f"run folder {str(run_dir)!r} is in use by {holder}; wait for it to finish (one writer at a time)"
        ) from None
    command = command or " ".join(["gemmascope", *sys.argv[1:]])
    with suppress(OSError):  # who holds it, for the next writer's message; a full disk only leaves that out
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} ({command})\n".encode(), 0)
    return fd


@contextmanager
def locked_run(path: Path | str, command: str) -> Iterator[Path | None]:
    """Hold the lock of the run folder `path` is or lies in (`run_of`) for a whole command that may
    write into it; yield that folder (None, and no lock, outside any run folder)."""
    run_dir = run_of(path)
    if run_dir is None:
        yield None
        return
    with lock(run_dir, command):
        yield run_dir


def run_holding(path: Path | str) -> Path | None:
    """The run folder a file about to be written lies in: the nearest folder above it that holds a
    run.json or the lock file (every command that writes a run folder took its lock there once)."""
    for folder in Path(path).absolute().parents:
        if (folder / LOCK_FILE).is_file() or (folder / RUN_JSON).is_file():
            return folder
    return None


@contextmanager
def held_by_writer(path: Path | str) -> Iterator[None]:
    """The run folder's lock around one write into it (re-entrant: free when this process holds it
    already, as every command does from its start), so no writer, a library call or a server route,
    writes into a run folder while another process holds it."""
    run_dir = run_holding(path)
    if run_dir is None:
        yield
        return
    with lock(run_dir):
        yield
