"""The run folder. Owns its layout and file names, SAE ids and finding SAEs, resolving the run and
SAE folders a command is given, opening a run (`open_run`: its model, SAEs, feature index, densities
and explanations, with the one rule for which model a set of SAEs belongs to), the one atomic write,
the one-writer lock and the name checks that keep a user-given name inside the run folder.

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

Knows nothing of what is inside the files (see activations/, formats.py, train/, features/):
`open_run` hands them to their readers (`formats.load_sae`, `releases.load_release`,
`models.load_model`, `features.FeatureIndex`), imported when a run is opened.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from itertools import takewhile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemmascope.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from torch import Tensor

    from gemmascope.features.store import FeatureIndex
    from gemmascope.models import LanguageModel
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


def sae_dir(run_dir: Path | str, site: object, width: int, l0: float, kind: str = "") -> Path:
    """`run_dir/saes/SITE_KIND/layer_L/width_W/l0_K`, K the measured L0 rounded, as Gemma Scope names
    its SAEs; `kind` (`train.TrainSpec.folder_kind`: the architecture's tag, Matryoshka, transcoder)
    follows as a suffix (`l0_52_topk`, `l0_52_skip_transcoder`) so such SAEs never share a folder."""
    from gemmascope.sites import parse_site

    parsed = parse_site(site)  # type: ignore[arg-type]
    name = f"l0_{round(l0)}" + (f"_{kind}" if kind else "")
    return Path(run_dir) / SAES / parsed.folder / f"width_{width}" / check_name(name, "SAE kind")


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


def open_sae(
    spec: str | None, run_dir: Path | None, flag: str = "--sae", device: str | None = None
) -> tuple[str, Path, SAE]:
    """`(sae_id, folder, SAE)` of an SAE named as `resolve_sae` takes it, loaded (on `device`, None:
    the CPU): an official release's SAE through `releases.load_release` (its model, site and, for a
    transcoder, output site filled in: the release's own files do not say them), any other with
    `formats.load_sae`."""
    from gemmascope.formats import load_sae
    from gemmascope.releases import load_release

    key, folder = resolve_sae(spec, run_dir, flag)
    if spec is not None and is_release_spec(spec):
        release, ident = spec.split("/", 1)
        return key, folder, load_release(release, ident, device=device or "cpu")
    return key, folder, load_sae(folder, device=device or "cpu")


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


# ---------------------------------------------------------------------------------------------
# Opening a run: its model, its SAEs, its feature index


def read_run_json(run_dir: Path | str) -> dict[str, Any]:
    """What `run.json` records ({} without one); a damaged one is a StoreError naming it (`read_json`)."""
    path = Path(run_dir) / RUN_JSON
    return read_json(path, "run description") if path.is_file() else {}


def model_for(
    saes: Iterable[SAE], run_dir: Path | str | None = None, model: str | None = None, what: str = "the SAEs"
) -> str:
    """The model a set of SAEs belongs to, the one rule of every command and the server: `model`
    when given (--model); else the run folder's (`run.json`'s "model"); else the one model the SAEs'
    metadata names (cfg.json `metadata.model_name`; an SAE naming none does not count). A
    ConfigError when they name several, or none."""
    if model:
        return model
    named = read_run_json(run_dir).get("model") if run_dir is not None else None
    if not isinstance(named, str | None):
        raise StoreError(
            f"run description {str(Path(str(run_dir)) / RUN_JSON)!r} is damaged: its model {named!r} is not a name"
        )
    if named:
        return named
    names = sorted({sae.cfg.model_name for sae in saes if sae.cfg.model_name})
    if len(names) == 1:
        return names[0]
    found = f": found {', '.join(names)}" if names else ""
    raise ConfigError(
        f"{what} name no single model in their metadata (cfg.json 'metadata.model_name'{found}): "
        "pass --model NAME"
    )


class OpenRun:
    """A run opened for reading: its SAEs by id (and their folders), the model they belong to
    (`model_for`, loaded on first use), and the feature index (opened on first use, so it may be
    built after the run was opened). What the index says of an SAE (densities, columns,
    explanations) is given only when the index was built from these very weights; `not_indexed`
    says why not otherwise. Safe to share between threads."""

    def __init__(self, run_dir: Path | None, saes: dict[str, SAE], folders: dict[str, Path],
                 index_path: Path | None, model: str | LanguageModel | None = None,
                 device: str | None = None, named: dict[str | None, str] | None = None) -> None:  # fmt: skip
        self.run_dir, self.saes, self.folders, self.index_path = run_dir, saes, folders, index_path
        self.device, self._lock, self.named = device, threading.RLock(), named or {}  # named: spec -> key
        self._index: FeatureIndex | None = None
        self._model = None if model is None or isinstance(model, str) else model
        self._model_name = model if isinstance(model, str) else (self._model.name if self._model else None)
        self._not_indexed: dict[str, str | None] = {}
        self._columns: dict[tuple[str, str], Tensor] = {}

    @property
    def model_name(self) -> str:
        """The model the SAEs belong to (`model_for`; a ConfigError when nothing names one)."""
        if self._model_name is None:
            self._model_name = model_for(self.saes.values(), self.run_dir)
        return self._model_name

    @property
    def model(self) -> LanguageModel:
        """The model, loaded on first use (`models.load_model`)."""
        with self._lock:
            if self._model is None:
                from gemmascope import models

                name = self.model_name
                self._model = (
                    models.load_model(name) if not self.device else models.load_model(name, self.device)
                )
            return self._model

    def index(self) -> FeatureIndex | None:
        """The feature index, opened on first use; None while there is no index file. A damaged
        file is a StoreError."""
        with self._lock:
            if self._index is None and self.index_path is not None and self.index_path.is_file():
                from gemmascope.features.store import FeatureIndex

                self._index = FeatureIndex(self.index_path)
            return self._index

    def feature_index(self) -> FeatureIndex:
        """The feature index; a StoreError saying how to build it when there is none."""
        index = self.index()
        if index is not None:
            return index
        if self.index_path is None:
            raise StoreError(
                "no feature index: these SAEs are served without a run folder (feature pages need a run "
                "indexed with 'gemmascope index')"
            )
        where = self.run_dir or self.index_path.parent
        raise StoreError(
            f"this run has no feature index ({self.index_path.name}): build it with 'gemmascope index {where}'"
        )

    def not_indexed(self, key: str) -> str | None:
        """Why the index cannot describe SAE `key` (no index, not in it, built from other weights,
        a damaged file), or None when it can. Remembered once the index exists."""
        with self._lock:
            if key not in self.saes:
                return f"no SAE {key!r} is open in this run"
            if key in self._not_indexed:
                return self._not_indexed[key]
            try:
                self.feature_index().check_sae(key, self.saes[key])
                reason = None
            except StoreError as err:
                reason = str(err)
            if self.index_path is not None and self.index_path.is_file():
                self._not_indexed[key] = reason
            return reason

    def column(self, key: str, name: str) -> Tensor | None:
        """`[d_sae]` per-latent `density`, `max_act` (float64) or `n_fired` of SAE `key` from the
        index, None when the index does not describe it."""
        with self._lock:
            if (key, name) not in self._columns:
                if self.not_indexed(key):
                    return None
                self._columns[(key, name)] = self.feature_index().column(key, name)
            return self._columns[(key, name)]

    def densities(self, key: str) -> Tensor | None:
        """`[d_sae]` the share of the index corpus' tokens each latent fires on, or None."""
        return self.column(key, "density")

    def explanations(self, key: str, latents: Iterable[int]) -> dict[int, str]:
        """The best explanation of each of these latents of SAE `key` that has one (none when the
        index does not describe it): `FeatureIndex.best_explanations`."""
        if self.not_indexed(key):
            return {}
        return self.feature_index().best_explanations(key, latents)

    def explanation(self, key: str, latent: int) -> str:
        """The best explanation of one latent, or ""."""
        return self.explanations(key, [latent]).get(latent, "")


def open_run(
    run_dir: Path | str | None = None,
    saes: Sequence[str | None] | None = None,
    *,
    model: str | LanguageModel | None = None,
    index: Path | str | None = None,
    device: str | None = None,
    flag: str = "--sae",
) -> OpenRun:
    """Open a run: the one way every command and the server load SAEs, their model and the index.

    - `run_dir`: a run folder, or one SAE folder (its run, if it is in one, becomes the run folder);
      None when the SAEs are named on their own.
    - `saes`: None for every finished SAE of `run_dir`; else the SAEs as `--sae` names them (an SAE
      folder, an SAE id of `run_dir`, an official `RELEASE/ID`; None: the run's only SAE), in order,
      each once. Keys are `sae_id`s (a release's `RELEASE/ID`).
    - `model`: a model name or a loaded model; None: `model_for` (the run's, else the SAEs').
    - `index`: the feature index to read; None: `RUN/features.sqlite`, or the `features.sqlite` a
      lone SAE folder holds (what `gemmascope index SAE_DIR` writes).
    Weights load here; the model loads on first use of `.model`, the index on first use."""
    run = Path(run_dir) if run_dir is not None else None
    if saes is None:
        if run is None:
            raise ConfigError("open a run folder, or name the SAEs to open")
        run, found = resolve_saes(run)
        saes = [str(folder) for folder in found]
    elif run is not None and not (run / SAES).is_dir() and is_sae_folder(run):
        run = run_of(run)
    folders: dict[str, Path] = {}
    loaded: dict[str, SAE] = {}
    named: dict[str | None, str] = {}
    for spec in saes:
        key, folder = resolve_sae(spec, run, flag)
        named[spec] = key
        if key in folders:
            if folders[key].resolve() != folder.resolve():
                raise ConfigError(
                    f"{flag} {spec!r} is named {key!r}, as another SAE already opened: give each SAE once"
                )
            continue
        folders[key], loaded[key] = folder, open_sae(spec, run, flag, device)[2]
    if run is None and folders:
        run = run_of(next(iter(folders.values())))
    if index is None and run is not None:
        index = run / FEATURES_DB
    elif index is None and len(folders) == 1 and (next(iter(folders.values())) / FEATURES_DB).is_file():
        index = next(iter(folders.values())) / FEATURES_DB
    return OpenRun(run, loaded, folders, Path(index) if index else None, model, device, named)
