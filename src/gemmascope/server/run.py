"""The run folder as the server holds it. Owns opening a run once at start-up (`opening.open_run`: the
model, every SAE under `saes/` and those named with `--sae`, the feature index `features.sqlite`),
the eval report under `report/`, the lock that serialises model work, and the bounds on what one
request may ask the model to do (`limits`' `REQUEST_*` values).

Knows nothing of HTTP: the routes live in the routers (pages.py, saes.py, activations.py,
search.py, steering.py, graphs.py), which app.py mounts. Paths never come from a request: SAEs are
looked up by id in a table built at start-up, and report files by exact name in a listing of `report/`.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemmascope.errors import ConfigError, StoreError
from gemmascope.limits import REQUEST_PROMPT_CHARS, REQUEST_PROMPT_TOKENS
from gemmascope.models import LanguageModel, prompt_tokens, token_texts
from gemmascope.opening import OpenRun, open_run
from gemmascope.runs import EVAL_FILE, EVALS_JSON, GRAPHS, REPORT, find_clts, find_saes
from gemmascope.sae import SAE, sae_site

_REPORT_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.(png|svg|json)$")


@dataclass
class LoadedSAE:
    """One SAE of the run with what the pages show about it: `id` in URLs, `key` in the open run
    (they differ only for an official release: `RELEASE/ID` there, with "." for "/" here)."""

    id: str
    sae: SAE
    site: str
    kind: str
    layer: int
    eval: dict[str, Any] = field(default_factory=dict)
    key: str = ""

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
            "architecture": f"{cfg.architecture} (CLT layer)"
            if "clt_layer" in cfg.extra
            else cfg.architecture,
            "d_in": self.sae.d_in,
            "d_sae": self.sae.d_sae,
            "width": self.sae.d_sae,
            "eval": self.eval,
        }


class Run:
    """A run folder opened for serving: the open run (`opened`: model, SAEs, feature index), the SAEs
    by URL id with their eval numbers, and the report.

    Model work (`model_lock`) runs one request at a time: torch hooks are per model, so two
    requests editing or capturing the same model at once would see each other's hooks."""

    def __init__(
        self,
        run_dir: str | Path | None,
        model: LanguageModel | str | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        """`extra`: SAEs named as the CLI's `--sae` takes them (an SAE folder, or an official
        release's `RELEASE/ID`), served beside the run's own; with no run folder, only those.
        `model`: a model name or one already loaded; None: the run's (`runs.model_for`)."""
        if run_dir is None and not extra:
            raise ConfigError("serve needs a run folder, or SAEs to serve: --sae RELEASE/ID or an SAE folder")
        self.run_dir = Path(run_dir).expanduser().resolve() if run_dir is not None else None
        if self.run_dir is not None and not self.run_dir.is_dir():
            raise StoreError(
                f"run folder {str(run_dir)!r} does not exist: expected a folder made by gemmascope"
            )
        own = [str(folder) for folder in find_saes(self.run_dir)] if self.run_dir else []
        if not own and not extra and not (self.run_dir and find_clts(self.run_dir)):
            raise StoreError(
                f"run folder {str(self.run_dir)!r} holds no SAEs and no cross-layer transcoder: expected "
                "saes/SITE/layer_L/width_W/l0_K/cfg.json or clts/width_W/l0_K/"
            )  # a run of a CLT alone is served for its Graph page
        # a CLT's layers are served as dictionaries of their own: graph nodes link to their pages
        self.opened: OpenRun = open_run(self.run_dir, [*own, *extra], model=model, clt_layers=True)
        served = {_url_id(self.opened.named[folder]) for folder in own}
        for spec in extra:
            url = _url_id(self.opened.named[spec])
            if url in served:
                raise ConfigError(
                    f"--sae {spec!r} is named {url!r}, as an SAE already served: give each SAE once "
                    "(a run's own SAEs are served without --sae)"
                )
            served.add(url)
        self.model_name = self.opened.model_name
        self.model = self.opened.model
        evals = self._read_evals()
        self.saes: dict[str, LoadedSAE] = {}
        for key, sae in self.opened.saes.items():
            sae.eval()
            site = sae_site(self.model, sae, key)  # the model has this site, of this width
            url = _url_id(key)
            result = (
                evals.get(key) or _eval_summary(self.opened.folders[key] / EVAL_FILE) or _clt_layer_eval(sae)
            )
            self.saes[url] = LoadedSAE(url, sae, str(site), site.kind, site.layer, result, key)
        self.model_lock = threading.Lock()
        self.graph_clt: str | None = (
            None  # graphs over the run's CLT (a substring of its folder; "": the only one)
        )
        self.index_path = self.opened.index_path
        self.report_dir = self.run_dir / REPORT if self.run_dir else None

    # -- what the run holds --------------------------------------------------------------------

    @property
    def first_sae(self) -> LoadedSAE:
        """The SAE a request that names none reads; a ConfigError when the run holds none (a
        cross-layer transcoder alone: graphs only)."""
        if not self.saes:
            raise ConfigError(
                "this run holds no SAEs, only a cross-layer transcoder: its Graph page draws graphs over it; "
                "train SAEs (gemmascope train RUN --sites ...) for the other pages"
            )
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

    # -- the feature index (the open run's: `opening.OpenRun`) ------------------------------------

    def feature_index(self) -> Any:
        """The run's `features.FeatureIndex`, opened on first use (it may be built after the
        server started); StoreError when the run has none."""
        return self.opened.feature_index()

    def not_indexed(self, entry: LoadedSAE) -> str | None:
        """Why the index cannot describe this SAE (no index, not in it, built from other weights),
        or None when it can. Remembered once the index exists (restart the server after rebuilding it)."""
        return self.opened.not_indexed(entry.key)

    def column(self, entry: LoadedSAE, name: str) -> torch.Tensor | None:
        """`[d_sae]` per-feature `density` or `max_act` from the index, None when not indexed."""
        return self.opened.column(entry.key, name)

    def firing(self, entry: LoadedSAE) -> Any:
        """Each feature's firing statistics (`features.Firing`, for the meaning-first order), read once;
        None when not indexed."""
        return self.opened.firing(entry.key)

    def explanations(self, entry: LoadedSAE, indices: list[int]) -> dict[int, str]:
        """The best explanation of each of these features that has one (none when not indexed)."""
        return self.opened.explanations(entry.key, indices)

    # -- model work (call with model_lock held: the tokenizer is shared with the model's users) --

    @staticmethod
    def check_text(text: str) -> None:
        """Refuse an empty or over-long prompt before it queues for the model (ConfigError)."""
        if not text or not text.strip():
            raise ConfigError("the prompt is empty: expected some text")
        if len(text) > REQUEST_PROMPT_CHARS:
            raise ConfigError(
                f"the prompt is {len(text)} characters long: expected at most {REQUEST_PROMPT_CHARS}"
            )

    def prompt_ids(self, text: str, max_tokens: int = REQUEST_PROMPT_TOKENS) -> list[int]:
        """Token ids of a prompt (BOS first), refusing an empty or over-long one with ConfigError."""
        self.check_text(text)
        return prompt_tokens(self.model, text, max_tokens)[0].tolist()  # type: ignore[no-any-return]

    def token_strings(self, ids: list[int]) -> list[str]:
        return token_texts(self.model.tokenizer, ids)


def _url_id(key: str) -> str:
    """An SAE's id in URLs: its key with "/" (an official release's `RELEASE/ID`) as "."."""
    return key.replace("/", ".")


def _eval_summary(path: Path) -> dict[str, Any]:
    """The flat headline numbers of an SAE folder's own `eval.json`, or {} without one."""
    from gemmascope.evals import summary

    result = _read_json(path)
    try:
        return summary(result) if result else {}
    except (KeyError, TypeError):
        return {}


def _clt_layer_eval(sae: SAE) -> dict[str, Any]:
    """A CLT layer's held-out figures from its training (`clt.layer_sae`'s `heldout`: FVU of its
    layer's MLP output with every earlier layer's writes, L0, dead), in the eval's column names; {}
    for anything else."""
    heldout = sae.cfg.extra.get("heldout") or {}
    names = {"l0": "l0", "fvu": "fvu", "dead": "frac_dead", "tokens": "n_tokens"}
    return {names[k]: (int(v) if k == "tokens" else v) for k, v in heldout.items() if k in names}


def _read_json(path: Path) -> Any:
    """A JSON file's content, or {} when there is none; a corrupt one is a StoreError."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StoreError(f"cannot read {str(path)!r}: {err}") from err
