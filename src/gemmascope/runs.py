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
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

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
LOCK_FILE = ".lock"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
EVAL_FILE = "eval.json"
TMP_SUFFIX = ".tmp"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


# ---------------------------------------------------------------------------------------------
# Names and SAEs


def check_name(name: str, what: str = "--name") -> str:
    """A user-given name that becomes a file or folder name in the run folder: one plain path part
    (letters, digits, `._+=-`), so it can never point outside the run folder."""
    if not _NAME.fullmatch(name or "") or ".." in name:
        raise ConfigError(
            f"{what} {name!r} is not a plain name: expected letters, digits, '.', '_', '-' "
            "(no '/' or '..'), so it stays inside the run folder"
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


# ---------------------------------------------------------------------------------------------
# The one atomic write


def tmp_path(path: Path) -> Path:
    """The temporary name `path` is written under before the rename: `NAME.tmp` in the same folder
    (a writer that picks the format by suffix must be given an open file, see np.savez)."""
    return path.with_name(path.name + TMP_SUFFIX)


@contextmanager
def writing(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path for a writer that needs a path (torch.save, safetensors, np.savez);
    rename it to `path` when the block ends, or remove it when the block fails. A failure of the disk
    (full, read-only, permission) is a StoreError naming the file."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        why = os.strerror(err.errno) if err.errno else str(err)
        hint = "; free some disk space and re-run" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise StoreError(f"cannot write {str(path)!r}: {why}{hint}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise StoreError(
            f"run folder {str(run_dir)!r} is in use by {holder}; wait for it to finish (one writer at a time)"
        ) from None
    command = command or " ".join(["gemmascope", *sys.argv[1:]])
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} ({command})\n".encode(), 0)
    _held[key] = (fd, 1)
    try:
        yield
    finally:
        if _held[key][1] <= 1:
            del _held[key]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        else:
            _held[key] = (fd, _held[key][1] - 1)
