"""The run folder's layout (see `gemmascope.runs`): its file and folder names, the name checks that
keep a user-given name inside it, SAE ids and finding SAEs, the paths a run file records (relative
to the run folder), and resolving the run folder or SAE folder a command is given (an SAE by
id or release name: `opening.resolve_sae`).

Knows nothing of what is inside the files, and writes nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

from gemmascope.errors import ConfigError, StoreError

RUN_JSON = "run.json"
SUITE_JSON = "suite.json"
ACTIVATIONS = "activations"
HELDOUT = "heldout"  # heldout/activations/...: held-out split activations (naming SAEs by held-out L0)
MANIFEST = "manifest.json"
SAES = "saes"
CLTS = "clts"  # clts/width_W/l0_K[_skip]/: cross-layer transcoders (formats.clt's layout)
CHECKPOINTS = "checkpoints"
FEATURES_DB = "features.sqlite"
GRAPHS = "graphs"
EFFECTS = "effects"  # effects/SAE_ID/LATENT.json: a latent's measured output effects (outputs.py's cache)
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


def clt_layer_id(folder: Path | str, layer: int) -> str:
    """The id of one layer of a CLT folder as a dictionary of its own (`clt.layer_sae`), in the form
    of `sae_id`: `clt.3.w1024.l0_10_skip` for layer 3 of `clts/width_1024/l0_10_skip`."""
    parts = Path(folder).parts
    m_width = re.fullmatch(r"width_(\w+)", parts[-2]) if len(parts) >= 2 else None
    if m_width and parts[-1].startswith("l0_"):
        return f"clt.{layer}.w{m_width.group(1)}.{parts[-1]}"
    return f"clt.{layer}.{Path(folder).name}"


def sae_order(name: Path | str) -> tuple[tuple[int, int | str], ...]:
    """The one order SAEs are listed in (run folders, the index, the API, the pages, the CLI): by
    site, layer, width and L0 as an SAE id or folder names them, numbers compared as numbers
    (`resid_post.6` before `resid_post.10`, `w4096` before `w16384`), not as text."""
    return tuple((1, int(p)) if p.isdigit() else (0, p) for p in re.split(r"(\d+)", str(name)) if p)


def find_saes(run_dir: Path | str) -> list[Path]:
    """Every finished SAE folder under `run_dir/saes` (those holding cfg.json and weights), in
    `sae_order`."""
    root = Path(run_dir) / SAES
    found = [p.parent for p in root.glob(f"**/{CFG_FILE}") if (p.parent / WEIGHTS_FILE).exists()]
    return sorted((p for p in found if not p.name.endswith(TMP_SUFFIX)), key=sae_order)


def find_clts(run_dir: Path | str) -> list[Path]:
    """Every finished CLT folder under `run_dir/clts` (those holding their first layer's encoder
    file and their config), sorted."""
    root = Path(run_dir) / CLTS
    found = [p.parent for p in root.glob("**/W_enc_0.safetensors") if (p.parent / "clt.json").is_file()]
    return sorted(p for p in found if not p.name.endswith(TMP_SUFFIX))


def is_sae_folder(folder: Path) -> bool:
    """True for a folder holding an SAE (cfg.json and weights) and nothing but SAE and eval files."""
    return folder.is_dir() and (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


# Top-level names of the run layout: where an absolute path stored by an older version is re-rooted.
_LAYOUT = (SAES, CLTS, ACTIVATIONS, HELDOUT, CHECKPOINTS, GRAPHS, REPORT, EFFECTS)


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
