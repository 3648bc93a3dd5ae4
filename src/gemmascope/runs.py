"""The run folder. Owns its layout and file names, SAE ids and finding SAEs, resolving the run and
SAE folders a command is given, the one atomic write, the one-writer lock and the name checks that
keep a user-given name inside the run folder.

    runs/NAME/
      run.json, suite.json                  what was asked; which suite stages are finished
      activations/SITE/layer_L/             shards + manifest.json
      heldout/activations/SITE/layer_L/     the same for a slice of the held-out split (HELDOUT; when
                                            harvested, training names SAEs by their L0 there)
      saes/SITE/layer_L/width_W/l0_K/       cfg.json, sae_weights.safetensors, sparsity.safetensors, eval.json
      checkpoints/NAME/                     state.pt, done.json (training)
      features.sqlite                       the feature index
      graphs/, report/                      attribution graphs; evals.json, plots, training logs
      .lock                                 held by the one writer

Knows nothing of what is inside the files (see activations/, formats.py, train/, features/).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from itertools import takewhile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemmascope.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from gemmascope.sae import SAE

RUN_JSON = "run.json"
SUITE_JSON = "suite.json"
ACTIVATIONS = "activations"
HELDOUT = "heldout"  # heldout/activations/...: held-out split activations (naming SAEs by held-out L0)
MANIFEST = "manifest.json"
SAES = "saes"
CHECKPOINTS = "checkpoints"
FEATURES_DB = "features.sqlite"
GRAPHS = "graphs"
REPORT = "report"
EVALS_JSON = "evals.json"
REPLACEMENT_JSON = "replacement.json"  # in report/: the replacement model's loss (suites with transcoders)
SUMMARY_TXT = "summary.txt"  # in report/: the table of every SAE's headline numbers
LOCK_FILE = ".lock"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
EVAL_FILE = "eval.json"
TMP_SUFFIX = ".tmp"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")
# Longest user-given name: file systems allow 255 bytes a name, and files add suffixes to it
# (`NAME.rank1of2_curves.png.tmp`); the names are ASCII, one byte a character.
MAX_NAME = 128


# ---------------------------------------------------------------------------------------------
# Names and SAEs


def check_name(name: str, what: str = "--name") -> str:
    """A user-given name that becomes a file or folder name in the run folder: one plain path part
    (letters, digits, `._+=-`), so it can never point outside the run folder, and short enough
    (MAX_NAME) that every file named after it (`NAME_curves.png.tmp`, ...) fits the file-name limit."""
    if not _NAME.fullmatch(name or "") or ".." in name:
        raise ConfigError(
            f"{what} {name!r} is not a plain name: expected letters, digits, '.', '_', '-' "
            "(no '/' or '..'), so it stays inside the run folder"
        )
    if len(name) > MAX_NAME:
        raise ConfigError(
            f"{what} {name[:40]!r}... is {len(name)} characters long: expected at most {MAX_NAME}"
        )
    return name


def sae_dir(run_dir: Path | str, site: object, width: int, l0: float, architecture: str = "jumprelu") -> Path:
    """`run_dir/saes/KIND/layer_L/width_W/l0_K`, K the measured L0 rounded, as Gemma Scope names its
    SAEs; baselines get their architecture as a suffix (`l0_52_topk`) so they never share a folder."""
    from gemmascope.sites import parse_site

    parsed = parse_site(site)  # type: ignore[arg-type]
    name = f"l0_{round(l0)}" + ("" if architecture == "jumprelu" else f"_{architecture}")
    return Path(run_dir) / SAES / parsed.folder / f"width_{width}" / check_name(name, "architecture")


def sae_id(folder: Path | str) -> str:
    """A short id of an SAE folder in a run: `resid_post.6.w4096.l0_52`; the folder name otherwise."""
    parts = Path(folder).parts
    if len(parts) >= 4:
        kind, layer, width, l0 = parts[-4:]
        m_layer, m_width = re.fullmatch(r"layer_(\d+)", layer), re.fullmatch(r"width_(\w+)", width)
        if m_layer and m_width and l0.startswith("l0_"):
            return f"{kind}.{m_layer.group(1)}.w{m_width.group(1)}.{l0}"
    return Path(folder).name


def find_saes(run_dir: Path | str) -> list[Path]:
    """Every finished SAE folder under `run_dir/saes` (those holding cfg.json and weights), sorted."""
    root = Path(run_dir) / SAES
    found = [p.parent for p in root.glob(f"**/{CFG_FILE}") if (p.parent / WEIGHTS_FILE).exists()]
    return sorted(p for p in found if not p.name.endswith(TMP_SUFFIX))


def is_sae_folder(folder: Path) -> bool:
    """True for a folder holding an SAE (cfg.json and weights) and nothing but SAE and eval files."""
    return folder.is_dir() and (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


# Top-level names of the run layout: where an absolute path stored by an older version is re-rooted.
_LAYOUT = (SAES, ACTIVATIONS, HELDOUT, CHECKPOINTS, GRAPHS, REPORT)


def stored_path(run_dir: Path | str, path: Path | str) -> str:
    """How a run file records a path: relative to the run folder (so a copied or moved run folder
    names its own files), absolute only for a path outside it."""
    path, run_dir = Path(path).absolute(), Path(run_dir).absolute()
    return path.relative_to(run_dir).as_posix() if path.is_relative_to(run_dir) else str(path)


def run_path(run_dir: Path | str, stored: str) -> Path:
    """The path a run file recorded (`stored_path`), in this run folder. An absolute one written by
    an older version is read as the same place in this run folder when it lies under one of the
    run layout's folders (saes/, checkpoints/, ...), so a copy never reports the original's files."""
    run_dir, path = Path(run_dir), Path(stored)
    if not path.is_absolute():
        return run_dir / path
    if path.is_relative_to(run_dir.absolute()):
        return path
    parts = path.parts  # the last layout folder not itself inside one (heldout/activations/...)
    starts = [i for i, part in enumerate(parts) if part in _LAYOUT and parts[i - 1] not in _LAYOUT]
    return run_dir.joinpath(*parts[starts[-1] :]) if starts else path


# ---------------------------------------------------------------------------------------------
# Resolving what a command is given


def run_of(path: Path | str) -> Path | None:
    """The run folder that holds `path`: itself when it has saes/ or run.json, else the parent of the
    nearest `saes` folder above it; None when it is in no run folder."""
    path = Path(path)
    if (path / SAES).is_dir() or (path / RUN_JSON).is_file():
        return path
    above = next((p for p in path.resolve().parents if p.name == SAES), None)
    return above.parent if above is not None else None


def resolve_saes(path: Path | str, what: str = "run folder") -> tuple[Path | None, list[Path]]:
    """`(run_dir, SAE folders)` of a run folder (every finished SAE under saes/) or one SAE folder."""
    path = Path(path)
    if (path / SAES).is_dir():
        found = find_saes(path)
        if not found:
            raise StoreError(f"{what} {str(path)!r} holds no finished SAEs under {SAES}/")
        return path, found
    if path.is_dir():
        return run_of(path), [path]
    raise StoreError(f"no run folder or SAE folder at {str(path)!r}")


def resolve_sae(spec: str | None, run_dir: Path | None, flag: str = "--sae") -> tuple[str, Path]:
    """`(sae_id, folder)` of an SAE given as a folder, as an SAE id of `run_dir` (`spec` may be
    None when the run holds one SAE), or as an official release's `RELEASE/ID` (e.g.
    `gemma-scope-2-270m-pt/resid_post/layer_6_width_16k_l0_small`: from $GEMMASCOPE_RELEASES or the
    hub, `releases.release_file`)."""
    if spec is not None and Path(spec).is_dir():
        return sae_id(spec), Path(spec)
    if spec is not None and is_release_spec(spec):
        from gemmascope.releases import release_file

        release, ident = spec.split("/", 1)
        return spec, release_file(release, ident).parent
    if run_dir is None:
        raise ConfigError(
            f"{flag} {spec!r} is not a folder: give an SAE folder, an official RELEASE/ID "
            "(e.g. gemma-scope-2-270m-pt/resid_post/layer_6_width_16k_l0_small) or a run folder with an SAE id"
        )
    found = {sae_id(folder): folder for folder in find_saes(run_dir)}
    if spec is None and len(found) == 1:
        return next(iter(found.items()))
    if spec in found:
        return spec, found[spec]
    raise StoreError(
        f"no SAE {spec!r} in {str(run_dir)!r}: expected {flag} with one of {', '.join(sorted(found)) or 'none'}"
    )


def is_release_spec(spec: str) -> bool:
    """Whether an SAE named on the command line is an official release's `RELEASE/ID`."""
    return spec.startswith("gemma-scope-") and "/" in spec and not Path(spec).is_dir()


def open_sae(spec: str | None, run_dir: Path | None, flag: str = "--sae") -> tuple[str, Path, SAE]:
    """`(sae_id, folder, SAE)` of an SAE named as `resolve_sae` takes it, loaded: an official
    release's SAE through `releases.load_release` (its model, site and, for a transcoder, output
    site filled in: the release's own files do not say them), any other with `formats.load_sae`."""
    from gemmascope.formats import load_sae
    from gemmascope.releases import load_release

    key, folder = resolve_sae(spec, run_dir, flag)
    if spec is not None and is_release_spec(spec):
        release, ident = spec.split("/", 1)
        return key, folder, load_release(release, ident)
    return key, folder, load_sae(folder)


def find_index(places: list[Path]) -> Path | None:
    """The first `features.sqlite` found in these folders."""
    return next((p / FEATURES_DB for p in places if (p / FEATURES_DB).is_file()), None)


def read_json(path: Path | str, what: str) -> dict[str, Any]:
    """A JSON object file of a run folder (run.json, suite.json, eval.json, ...); a StoreError
    naming it and `what` it is when it is unreadable, damaged or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise StoreError(
            f"{what} {str(path)!r} is unreadable or damaged ({why}); restore or delete it"
        ) from None
    if not isinstance(data, dict):
        raise StoreError(
            f"{what} {str(path)!r} is damaged: expected a JSON object, found {type(data).__name__}"
        )
    return data


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
