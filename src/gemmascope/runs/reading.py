"""Reading a run: its JSON files (`read_json`, `read_run_json`), one SAE (`open_sae`), and opening a
run (`open_run`: its model, SAEs, feature index, densities, firing statistics and explanations, with the one rule for
which model a set of SAEs belongs to, `model_for`).

Knows nothing of what is inside the files: `open_run` hands them to their readers
(`formats.load_sae`, `releases.load_release`, `models.load_model`, `features.FeatureIndex`), imported
when a run is opened.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemmascope.errors import ConfigError, StoreError
from gemmascope.runs.layout import (
    FEATURES_DB,
    RUN_JSON,
    SAES,
    is_release_spec,
    is_sae_folder,
    resolve_sae,
    resolve_saes,
    run_of,
)

if TYPE_CHECKING:
    from torch import Tensor

    from gemmascope.features.rank import Firing
    from gemmascope.features.store import FeatureIndex
    from gemmascope.models import LanguageModel
    from gemmascope.sae import SAE


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
