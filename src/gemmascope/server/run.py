"""The run folder as the server holds it. Owns loading a run once at start-up (the model named in
`run.json`, every SAE under `saes/`, the feature index `features.sqlite`, the eval report under
`report/`), the lock that serialises model work, the bounds on what one request may ask the model
to do, and the few computations the pages need that are not a pipeline function of their own
(one latent's activation on each token of a text).

Knows nothing of HTTP: the routes live in the routers (pages.py, saes.py, activations.py,
search.py, steering.py), which app.py mounts. Paths never come from a request: SAEs are looked up
by id in a table built at start-up, and report files by exact name in a listing of `report/`.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemmascope.errors import ConfigError, StoreError
from gemmascope.formats import load_sae
from gemmascope.models import BUNDLED_MODEL, LanguageModel, load_model, prompt_tokens, token_texts
from gemmascope.runs import EVAL_FILE, EVALS_JSON, FEATURES_DB, GRAPHS, REPORT, RUN_JSON
from gemmascope.sae import SAE, encode_inputs, sae_site
from gemmascope.sites import capture, parse_site

# The request limit: prompt tokens after BOS in one HTTP request that runs the model. Smaller than
# the library's `models.MAX_PROMPT_TOKENS`: a shared server bounds each request's work tighter.
MAX_REQUEST_TOKENS = 256
MAX_NEW_TOKENS = 64  # tokens one steering request may generate
MAX_PROMPT_CHARS = 4000  # refused before tokenising, so a huge body costs nothing
STRENGTH_FACTOR = 100.0  # |strength| <= this x the feature's max activation
STRENGTH_LIMIT = 10_000.0  # |strength| bound when the feature's max activation is unknown
_REPORT_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.(png|svg|json)$")


@dataclass
class LoadedSAE:
    """One SAE of the run with what the pages show about it."""

    id: str
    sae: SAE
    site: str
    kind: str
    layer: int
    eval: dict[str, Any] = field(default_factory=dict)

    @property
    def d_sae(self) -> int:
        return self.sae.d_sae

    def summary(self) -> dict[str, Any]:
        cfg = self.sae.cfg
        return {
            "id": self.id,
            "site": self.site,
            "kind": self.kind,
            "layer": self.layer,
            "hook_name": cfg.hook_name,
            "architecture": cfg.architecture,
            "d_in": self.sae.d_in,
            "d_sae": self.sae.d_sae,
            "width": self.sae.d_sae,
            "eval": self.eval,
        }


class Run:
    """A run folder loaded for serving: the model, the SAEs by id, the feature index, the evals.

    Model work (`model_lock`) runs one request at a time: torch hooks are per model, so two
    requests editing or capturing the same model at once would see each other's hooks."""

    def __init__(
        self, run_dir: str | Path | None, model: LanguageModel | None = None, extra: Sequence[str] = ()
    ) -> None:
        """`extra`: SAEs named as the CLI's `--sae` takes them (an SAE folder, or an official
        release's `RELEASE/ID`), served beside the run's own; with no run folder, only those."""
        from gemmascope.runs import find_saes, open_sae, sae_id

        if run_dir is None and not extra:
            raise ConfigError("serve needs a run folder, or SAEs to serve: --sae RELEASE/ID or an SAE folder")
        self.run_dir = Path(run_dir).expanduser().resolve() if run_dir is not None else None
        if self.run_dir is not None and not self.run_dir.is_dir():
            raise StoreError(
                f"run folder {str(run_dir)!r} does not exist: expected a folder made by gemmascope"
            )
        self.info = _read_json(self.run_dir / RUN_JSON) if self.run_dir else {}
        folders = find_saes(self.run_dir) if self.run_dir else []
        if not folders and not extra:
            raise StoreError(
                f"run folder {str(self.run_dir)!r} holds no SAEs: expected saes/SITE/layer_L/width_W/l0_K/cfg.json"
            )
        loaded = [(sae_id(folder), folder, load_sae(folder).eval()) for folder in folders]
        for spec in extra:
            key, folder, sae = open_sae(spec, self.run_dir)
            key = key.replace("/", ".")  # a path segment in URLs
            if key in {k for k, _, _ in loaded}:
                raise ConfigError(
                    f"--sae {spec!r} is named {key!r}, as an SAE already served: give each SAE once "
                    "(a run's own SAEs are served without --sae)"
                )
            loaded.append((key, folder, sae.eval()))
        self.model_name = str(self.info.get("model") or loaded[0][2].cfg.model_name or BUNDLED_MODEL)
        self.model = model if model is not None else load_model(self.model_name)
        evals = self._read_evals()
        self.saes: dict[str, LoadedSAE] = {}
        for key, folder, sae in loaded:
            site = sae_site(self.model, sae, key)  # the model has this site, of this width
            result = evals.get(key) or _eval_summary(Path(folder) / EVAL_FILE)
            self.saes[key] = LoadedSAE(key, sae, str(site), site.kind, site.layer, result)
        self.model_lock = threading.Lock()
        self.index_path = self.run_dir / FEATURES_DB if self.run_dir else None
        self._index: Any = None  # features.FeatureIndex, opened on first use; safe across threads
        self._index_lock = threading.Lock()
        self._not_indexed: dict[str, str | None] = {}  # sae id -> why it cannot be shown, or None
        self._columns: dict[tuple[str, str], torch.Tensor] = {}
        self.report_dir = self.run_dir / REPORT if self.run_dir else None

    # -- what the run holds --------------------------------------------------------------------

    @property
    def first_sae(self) -> LoadedSAE:
        return next(iter(self.saes.values()))

    def _read_evals(self) -> dict[str, dict[str, Any]]:
        """Headline eval numbers per SAE id from `report/evals.json` (its flat `summary` rows)."""
        data = _read_json(self.run_dir / REPORT / EVALS_JSON) if self.run_dir else {}
        rows = data.get("summary") if isinstance(data, dict) else None
        return {row["sae_id"]: row for row in rows or [] if isinstance(row, dict) and "sae_id" in row}

    def graph_dir(self) -> Path | None:
        """Where this run's attribution graphs live (`graphs/`); None when serving without a run."""
        return self.run_dir / GRAPHS if self.run_dir else None

    def report_files(self) -> list[str]:
        """Names of the plots and JSON files in `report/` (only plain, safely named files)."""
        if self.report_dir is None or not self.report_dir.is_dir():
            return []
        return sorted(p.name for p in self.report_dir.iterdir() if p.is_file() and _REPORT_FILE.match(p.name))

    def report_path(self, name: str) -> Path | None:
        """The report file with exactly this name, or None: the name is matched against the
        listing, never joined to a path as given."""
        return self.report_dir / name if self.report_dir and name in self.report_files() else None

    # -- the feature index ---------------------------------------------------------------------

    def feature_index(self) -> Any:
        """The run's `features.FeatureIndex`, opened on first use (it may be built after the
        server started); StoreError when the run has none."""
        with self._index_lock:
            if self._index is None:
                from gemmascope.features import FeatureIndex

                if self.index_path is None:
                    raise StoreError(
                        "no feature index: these SAEs are served without a run folder (feature pages "
                        "need a run indexed with 'gemmascope index')"
                    )
                if not self.index_path.is_file():
                    raise StoreError(
                        f"this run has no feature index ({self.index_path.name}): build it with "
                        f"'gemmascope index {self.run_dir}'"
                    )
                self._index = FeatureIndex(self.index_path)
            return self._index

    def not_indexed(self, entry: LoadedSAE) -> str | None:
        """Why the index cannot describe this SAE (no index, not in it, built from other weights),
        or None when it can. Remembered once the index exists (restart the server after rebuilding it)."""
        if entry.id in self._not_indexed:
            return self._not_indexed[entry.id]
        try:
            self.feature_index().check_sae(entry.id, entry.sae)
            reason = None
        except StoreError as err:
            reason = str(err)
        if self.index_path is not None and self.index_path.is_file():
            self._not_indexed[entry.id] = reason
        return reason

    def column(self, entry: LoadedSAE, name: str) -> torch.Tensor | None:
        """`[d_sae]` per-feature `density` or `max_act` from the index, None when not indexed."""
        key = (entry.id, name)
        if key not in self._columns:
            if self.not_indexed(entry):
                return None
            self._columns[key] = self.feature_index().column(entry.id, name)
        return self._columns[key]

    def explanations(self, entry: LoadedSAE, indices: list[int]) -> dict[int, str]:
        """The best explanation of each of these features that has one (none when not indexed)."""
        if self.not_indexed(entry):
            return {}
        index = self.feature_index()
        out = {}
        for i in indices:
            found = index.explanations(entry.id, i)
            if found:
                out[i] = str(found[0]["text"])
        return out

    # -- model work (call with model_lock held: the tokenizer is shared with the model's users) --

    @staticmethod
    def check_text(text: str) -> None:
        """Refuse an empty or over-long prompt before it queues for the model (ConfigError)."""
        if not text or not text.strip():
            raise ConfigError("the prompt is empty: expected some text")
        if len(text) > MAX_PROMPT_CHARS:
            raise ConfigError(
                f"the prompt is {len(text)} characters long: expected at most {MAX_PROMPT_CHARS}"
            )

    def prompt_ids(self, text: str, max_tokens: int = MAX_REQUEST_TOKENS) -> list[int]:
        """Token ids of a prompt (BOS first), refusing an empty or over-long one with ConfigError."""
        self.check_text(text)
        return prompt_tokens(self.model, text, max_tokens)[0].tolist()  # type: ignore[no-any-return]

    def token_strings(self, ids: list[int]) -> list[str]:
        return token_texts(self.model.tokenizer, ids)

    def strength_limit(self, max_activation: float | None) -> float:
        if max_activation is not None and math.isfinite(max_activation) and max_activation > 0:
            return STRENGTH_FACTOR * max_activation
        return STRENGTH_LIMIT

    def feature_acts(self, entry: LoadedSAE, index: int, ids: list[int]) -> list[float]:
        """Activation `[T]` of latent `index` of one SAE on each token of `ids` (BOS included; zero
        where the input is massive, as the microscope shows it: `sae.encode_inputs`)."""
        site = parse_site(entry.site)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        x = capture(self.model, input_ids, [site])[site][0]  # [T, d_in]
        return encode_inputs(entry.sae, x)[:, index].tolist()  # type: ignore[no-any-return]


def _eval_summary(path: Path) -> dict[str, Any]:
    """The flat headline numbers of an SAE folder's own `eval.json`, or {} without one."""
    from gemmascope.evals import summary

    result = _read_json(path)
    try:
        return summary(result) if result else {}
    except (KeyError, TypeError):
        return {}


def _read_json(path: Path) -> Any:
    """A JSON file's content, or {} when there is none; a corrupt one is a StoreError."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StoreError(f"cannot read {str(path)!r}: {err}") from err
