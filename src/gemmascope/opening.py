"""Opening a run for reading: the one way every command and the server load a run's SAEs (a folder,
an SAE id of the run, an official `RELEASE/ID`), the model they belong to (`runs.model_for`) and the
feature index (`open_run`, `OpenRun`; one SAE: `resolve_sae`, `open_sae`).

It sits above the readers it hands the files to (`formats.load_sae`, `releases`, `models.load_model`,
`features.store.FeatureIndex`), which all import `runs`; so it is not part of `runs`, which knows
nothing of what is inside the files. The readers are imported when a run is opened, so the command
line starts without them. Knows nothing of HTTP or of what a command prints.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gemmascope.errors import ConfigError, StoreError
from gemmascope.runs import (
    FEATURES_DB,
    SAES,
    clt_layer_id,
    find_clts,
    find_saes,
    is_sae_folder,
    model_for,
    resolve_saes,
    run_of,
    sae_id,
    sae_order,
)

if TYPE_CHECKING:
    from torch import Tensor

    from gemmascope.features.rank import Firing
    from gemmascope.features.store import FeatureIndex
    from gemmascope.models import LanguageModel
    from gemmascope.sae import SAE


def _clt_layers(
    run_dir: Path, clts: list[Path], device: str | None, keep: set[str] | None = None
) -> Iterable[tuple[str, Path, SAE]]:
    """`(key, folder, SAE)` of every layer of each CLT folder of the run (`clt.layer_sae`; only the
    keys in `keep` when given), the CLT itself not kept. A CLT folder that cannot be read is left
    out with a warning naming it and why, so one damaged CLT does not keep the run's SAEs (and its
    other CLTs) from opening."""
    import warnings

    from gemmascope.clt import layer_sae
    from gemmascope.errors import GemmaScopeError
    from gemmascope.formats.clt import load_clt

    for folder in clts:
        try:
            clt = load_clt(folder)
        except GemmaScopeError as e:
            warnings.warn(f"left out the CLT {str(folder)!r}: {e}", stacklevel=2)
            continue
        rel = folder.relative_to(run_dir)
        clt.cfg.extra["folder"] = str(rel)
        for layer in range(clt.n_layers):
            if keep is None or clt_layer_id(rel, layer) in keep:
                yield clt_layer_id(rel, layer), folder, layer_sae(clt, layer).to(device or "cpu")


def _is_clt_layer(spec: str | None, run_dir: Path | None) -> bool:
    """Whether `--sae` names one layer of a CLT of the run (`runs.clt_layer_id`: `clt.3.w1024...`)."""
    return run_dir is not None and spec is not None and spec.startswith("clt.") and not Path(spec).is_dir()


def _check_named_layers(named: set[str], loaded: dict[str, SAE], run: Path | None, flag: str) -> None:
    """A StoreError naming the CLT layers the run has when `--sae` names one it lacks."""
    missing = sorted(named - set(loaded))
    if missing and run is not None:
        have = [
            clt_layer_id(folder.relative_to(run), 0).replace("clt.0.", "clt.LAYER.", 1)
            for folder in find_clts(run)
        ]
        raise StoreError(
            f"no CLT layer {missing[0]!r} in {str(run)!r}: "
            + (f"expected {flag} {' or '.join(have)}" if have else "the run has no cross-layer transcoder")
        )


def is_release_spec(spec: str) -> bool:
    """Whether an SAE named on the command line is an official release's `RELEASE/ID`."""
    return spec.startswith("gemma-scope-") and "/" in spec and not Path(spec).is_dir()


def resolve_sae(spec: str | None, run_dir: Path | None, flag: str = "--sae") -> tuple[str, Path]:
    """`(sae_id, folder)` of an SAE given as a folder, as an SAE id of `run_dir` or the front of
    one that only one of its SAEs has (`resid_post.12`; `spec` may be None when the run holds one
    SAE), or as an official release's `RELEASE/ID` (e.g.
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
    # The front of an id names the SAE when one SAE has it: `resid_post.12` (the L0 the training
    # reached ends the id, so commands written before a run cannot know it).
    fronted = sorted((key for key in found if spec is not None and key.startswith(spec + ".")), key=sae_order)
    if len(fronted) == 1:
        return fronted[0], found[fronted[0]]
    if fronted:
        raise StoreError(
            f"{flag} {spec!r} fits {len(fronted)} SAEs of {str(run_dir)!r}: name one of {', '.join(fronted)}"
        )
    raise StoreError(
        f"no SAE {spec!r} in {str(run_dir)!r}: expected {flag} with one of {', '.join(sorted(found, key=sae_order)) or 'none'}"
        + (" (or the front of one that no other id shares)" if found else "")
    )


def open_sae(
    spec: str | None, run_dir: Path | None, flag: str = "--sae", device: str | None = None
) -> tuple[str, Path, SAE]:
    """`(sae_id, folder, SAE)` of an SAE named as `resolve_sae` takes it, loaded (on `device`, None:
    the CPU): an official release's SAE through `releases.load_release` (its model, site and, for a
    transcoder, output site filled in: the release's own files do not say them), any other with
    `formats.load_sae`."""
    key, folder = resolve_sae(spec, run_dir, flag)
    return key, folder, _load(spec, folder, device)


def _load(spec: str | None, folder: Path, device: str | None) -> SAE:
    """The SAE `resolve_sae` found for `spec` in `folder`, loaded (`open_sae`)."""
    from gemmascope.formats import load_sae
    from gemmascope.releases import load_release

    if spec is not None and is_release_spec(spec):
        release, ident = spec.split("/", 1)
        return load_release(release, ident, device=device or "cpu")
    return load_sae(folder, device=device or "cpu")


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
        self._firing: dict[str, Firing | None] = {}

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

    def firing(self, key: str) -> Firing | None:
        """Each latent's firing over the index corpus (`FeatureIndex.firing`, what the meaning-first
        ranking reads), read once; None when the index does not describe SAE `key` or lacks them."""
        with self._lock:
            if key not in self._firing:
                if self.not_indexed(key):
                    return None
                self._firing[key] = self.feature_index().firing(key)
            return self._firing[key]

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
    clt_layers: bool = False,
) -> OpenRun:
    """Open a run: the one way every command and the server load SAEs, their model and the index.

    - `run_dir`: a run folder, or one SAE folder (its run, if it is in one, becomes the run folder);
      None when the SAEs are named on their own.
    - `saes`: None for every finished SAE of `run_dir`; else the SAEs as `--sae` names them (an SAE
      folder, an SAE id of `run_dir` or its front, an official `RELEASE/ID`; None: the run's only
      SAE), in order,
      each once. Keys are `sae_id`s (a release's `RELEASE/ID`).
    - `model`: a model name or a loaded model; None: `model_for` (the run's, else the SAEs').
    - `index`: the feature index to read; None: `RUN/features.sqlite`, or the `features.sqlite` a
      lone SAE folder holds (what `gemmascope index SAE_DIR` writes).
    - `clt_layers`: also every layer of the run's CLTs as a dictionary of its own (`clt.layer_sae`,
      keyed `runs.clt_layer_id`: what graph nodes name), for their feature pages; a run of CLTs
      alone opens with their layers only.
    Weights load here; the model loads on first use of `.model`, the index on first use."""
    run = Path(run_dir) if run_dir is not None else None
    clts = find_clts(run) if clt_layers and run is not None else []  # none under an SAE folder
    if saes is None:
        if run is None:
            raise ConfigError("open a run folder, or name the SAEs to open")
        if clts and not find_saes(run):
            saes = []
        else:
            run, found = resolve_saes(run)
            saes = [str(folder) for folder in found]
    elif run is not None and not (run / SAES).is_dir() and is_sae_folder(run):
        run = run_of(run)
    folders: dict[str, Path] = {}
    loaded: dict[str, SAE] = {}
    named: dict[str | None, str] = {}
    named_layers = {spec for spec in saes if spec is not None and _is_clt_layer(spec, run)}
    for spec in [spec for spec in saes if spec not in named_layers]:
        key, folder = resolve_sae(spec, run, flag)
        named[spec] = key
        if key in folders:
            if folders[key].resolve() != folder.resolve():
                raise ConfigError(
                    f"{flag} {spec!r} is named {key!r}, as another SAE already opened: give each SAE once"
                )
            continue
        folders[key], loaded[key] = folder, _load(spec, folder, device)  # resolved once
    if named_layers and not clts:  # CLT layers named on their own: those only
        clts = find_clts(run) if run is not None else []
    keep = None if clt_layers else named_layers
    for key, folder, sae in _clt_layers(run, clts, device, keep) if run is not None else ():
        if key in folders:
            raise ConfigError(
                f"CLT folders {str(folders[key])!r} and {str(folder)!r} both name a layer {key!r}: "
                "expected clts/width_W/l0_K... folders of distinct names"
            )
        folders[key], loaded[key] = folder, sae
    _check_named_layers(named_layers, loaded, run, flag)
    named.update({spec: spec for spec in named_layers})
    if run is None and folders:
        run = run_of(next(iter(folders.values())))
    if index is None and run is not None:
        index = run / FEATURES_DB
    elif index is None and len(folders) == 1 and (next(iter(folders.values())) / FEATURES_DB).is_file():
        index = next(iter(folders.values())) / FEATURES_DB
    return OpenRun(run, loaded, folders, Path(index) if index else None, model, device, named)
