"""The main job: a Gemma Scope-like suite of SAEs in one run folder, and the demo. Owns `run.json`
(what was asked), `suite.json` (which stages are finished), the order of the stages (harvest once,
then per layer train and evaluate, then index and report), resuming a stopped suite without redoing
finished work, the time budget, the suite summary (table and layers x sites heatmap PNG), and the
choice of features the demo prints.

Calls only the public functions of the pipeline modules; knows nothing of their internals.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gemmascope import __version__
from gemmascope.errors import ConfigError, StoreError
from gemmascope.models import BUNDLED_MODEL, SITE_KINDS, LanguageModel, Site, load_model

# Gemma Scope 2 names its SAEs by L0 band: small 10-20, medium 30-60, big 90-150 (RECIPE 2,
# "L0 control"). A name asks for the middle of its band as the target L0.
L0_BANDS = {"small": 15.0, "medium": 45.0, "big": 120.0}
SUITE_KINDS = ("resid_post", "attn_out", "mlp_out")


@dataclass
class SuitePlan:
    """What a suite trains. `target_l0s` (Gemma Scope 2's target-L0 mode) or `l0_coeffs` (fixed
    lambdas, Gemma Scope's sweep) choose the sparsity of each SAE; every (site, width, sparsity)
    triple is one SAE. `tokens` activations are harvested per site and each SAE trains on
    `train_tokens` of them (several epochs when larger)."""

    model: str = BUNDLED_MODEL
    kinds: list[str] = field(default_factory=lambda: list(SUITE_KINDS))
    layers: list[int] | None = None  # None: every layer of the model
    widths: list[int] = field(default_factory=lambda: [4096])
    target_l0s: list[float] = field(default_factory=lambda: [L0_BANDS["medium"]])
    l0_coeffs: list[float] = field(default_factory=list)
    architecture: str = "jumprelu"
    tokens: int = 200_000
    train_tokens: int | None = None  # None: `tokens`
    eval_tokens: int = 8_192
    index_tokens: int = 16_384
    context_len: int = 128
    corpus: str = "wiki"
    dtype: str = "float32"
    seed: int = 0
    fast: bool = True
    batch_size: int | None = None  # None: the trainer's short-run default
    keep_activations: bool = True

    def check(self) -> None:
        bad = [k for k in self.kinds if k not in SITE_KINDS]
        if bad or not self.kinds:
            raise ConfigError(
                f"unknown site kinds {bad or self.kinds}: expected some of {', '.join(SUITE_KINDS)}"
            )
        if not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError(f"widths {self.widths} must be positive integers")
        if not self.target_l0s and not self.l0_coeffs:
            raise ConfigError("give target L0s (e.g. small,medium,big or numbers) or lambdas (--l0-coeffs)")
        for name, value in (("tokens", self.tokens), ("eval_tokens", self.eval_tokens)):
            if value < 1:
                raise ConfigError(f"{name} {value} must be at least 1")


def parse_l0s(spec: str) -> list[float]:
    """`small,medium,big` or numbers such as `20,50` to target L0s."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if part in L0_BANDS:
            out.append(L0_BANDS[part])
        else:
            try:
                value = float(part)
            except ValueError:
                raise ConfigError(
                    f"unknown L0 target {part!r}: expected {', '.join(L0_BANDS)} or a number"
                ) from None
            if value <= 0:
                raise ConfigError(f"L0 target {part!r} must be positive")
            out.append(value)
    return out


def parse_layers(spec: str, n_layers: int | None = None) -> list[int] | None:
    """`all`, `6`, `2,6,10` or `0-17` to layers (None for all)."""
    if spec.strip() == "all":
        return None
    layers: list[int] = []
    try:
        for part in spec.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                layers.extend(range(int(lo), int(hi) + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise ConfigError(f"bad layers {spec!r}: expected 'all', '6', '2,6,10' or '0-17'") from None
    if n_layers is not None:
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad:
            raise ConfigError(f"layers {bad} are out of range: valid layers are 0..{n_layers - 1}")
    return sorted(set(layers))


# ---------------------------------------------------------------------------------------------
# State of a run folder


class _State:
    """`suite.json`: the finished stages and what they produced, written atomically after each."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "suite.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {"done": {}}

    def done(self, stage: str) -> bool:
        return stage in self.data["done"]

    def get(self, stage: str) -> Any:
        return self.data["done"][stage]

    def finish(self, stage: str, value: Any = True) -> None:
        self.data["done"][stage] = value
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)


def _write_run_json(run_dir: Path, plan: SuitePlan) -> None:
    """Record what was asked; refuse a folder made for another model or corpus."""
    path = run_dir / "run.json"
    asked = {"gemmascope_version": __version__, **asdict(plan)}
    if path.exists():
        old = json.loads(path.read_text())
        for key in ("model", "corpus", "context_len"):
            if old.get(key) != asked[key]:
                raise StoreError(
                    f"run folder {run_dir} was made with {key}={old.get(key)!r}, not {asked[key]!r}; "
                    "use another folder"
                )
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asked, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The suite


class BudgetReached(Exception):
    """The time budget ran out between stages; everything finished so far is kept."""


def run_suite(
    run_dir: Path | str,
    plan: SuitePlan,
    max_minutes: float | None = None,
    model: LanguageModel | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) a suite in `run_dir`: harvest every site once, then per layer train and
    evaluate its SAEs, then build the feature index and the report. Finished stages are skipped.
    With `max_minutes`, no new stage starts once the budget is spent (re-run to continue).
    Returns the summary (`complete`, `saes`, `results`, `report`)."""
    from gemmascope.activations import harvest

    run_dir = Path(run_dir)
    plan.check()
    _write_run_json(run_dir, plan)
    state = _State(run_dir)
    model = model or load_model(plan.model)
    layers = plan.layers if plan.layers is not None else list(range(model.n_layers))
    sites = [Site(kind, layer) for layer in layers for kind in plan.kinds]
    for site in sites:
        if site.layer >= model.n_layers:
            raise ConfigError(f"layer {site.layer} is out of range: valid layers are 0..{model.n_layers - 1}")
    started = time.monotonic()

    def stage(name: str) -> bool:
        """True if the stage still has to run; raises BudgetReached when the time is up."""
        if state.done(name):
            return False
        if max_minutes is not None and time.monotonic() - started > 60 * max_minutes:
            raise BudgetReached(name)
        say(f"== {name}")
        return True

    try:
        if stage("harvest"):
            harvest(
                model,
                sites,
                run_dir,
                plan.tokens,
                corpus=plan.corpus,
                context_len=plan.context_len,
                dtype=plan.dtype,
            )
            state.finish("harvest")
        for layer in layers:
            layer_sites = [s for s in sites if s.layer == layer]
            if stage(f"train/layer_{layer}"):
                folders = _train_layer(run_dir, plan, layer_sites, layer)
                state.finish(f"train/layer_{layer}", [str(f.relative_to(run_dir)) for f in folders])
                if not plan.keep_activations:
                    _drop_activations(run_dir, layer_sites)
            if stage(f"eval/layer_{layer}"):
                _evaluate_layer(
                    run_dir, plan, model, [run_dir / p for p in state.get(f"train/layer_{layer}")]
                )
                state.finish(f"eval/layer_{layer}")
        folders = [run_dir / p for layer in layers for p in state.get(f"train/layer_{layer}")]
        if stage("index"):
            _index(run_dir, plan, model, folders)
            state.finish("index")
        if stage("report"):
            report = write_suite_report(run_dir, folders)
            state.finish("report", str(report.relative_to(run_dir)))
    except BudgetReached as stop:
        say(
            f"time budget of {max_minutes:g} min reached before stage {stop}; re-run the same command to continue"
        )
        return {"complete": False, "stopped_before": str(stop)}
    results = [json.loads((f / "eval.json").read_text()) for f in folders]
    return {"complete": True, "saes": folders, "results": results, "report": run_dir / state.get("report")}


def _train_layer(run_dir: Path, plan: SuitePlan, sites: Sequence[Site], layer: int) -> list[Path]:
    from gemmascope.train import TrainConfig, TrainSpec, train_saes

    specs = []
    for site in sites:
        for width in plan.widths:
            for target in plan.target_l0s:
                specs.append(
                    TrainSpec(site=str(site), width=width, architecture=plan.architecture, target_l0=target)
                )
            for coeff in plan.l0_coeffs:
                specs.append(
                    TrainSpec(site=str(site), width=width, architecture=plan.architecture, l0_coeff=coeff)
                )
    config = TrainConfig(
        name=f"layer_{layer}", seed=plan.seed, fast=plan.fast and plan.architecture == "jumprelu"
    )
    if plan.batch_size is not None:
        config.batch_size = plan.batch_size
    return train_saes(run_dir, specs, plan.train_tokens or plan.tokens, config)


def _drop_activations(run_dir: Path, sites: Sequence[Site]) -> None:
    """Free the disk of sites whose SAEs are trained (only when the plan does not keep them)."""
    import shutil

    for site in sites:
        shutil.rmtree(run_dir / "activations" / site.folder, ignore_errors=True)


def _evaluate_layer(run_dir: Path, plan: SuitePlan, model: LanguageModel, folders: Sequence[Path]) -> None:
    from gemmascope.evals import evaluate, write_eval
    from gemmascope.formats import load_sae, sae_id

    saes = {sae_id(f): load_sae(f) for f in folders}
    results = evaluate(
        model, saes, n_tokens=plan.eval_tokens, corpus=plan.corpus, context_len=plan.context_len
    )
    for folder, result in zip(folders, results, strict=True):
        write_eval(folder, result)


def _index(run_dir: Path, plan: SuitePlan, model: LanguageModel, folders: Sequence[Path]) -> None:
    from gemmascope.features import build_index
    from gemmascope.formats import load_sae, sae_id

    saes = {sae_id(f): load_sae(f) for f in folders}
    build_index(
        model,
        saes,
        run_dir / "features.sqlite",
        n_tokens=plan.index_tokens,
        corpus=plan.corpus,
        context_len=plan.context_len,
    )


# ---------------------------------------------------------------------------------------------
# Summary


def write_suite_report(run_dir: Path, folders: Sequence[Path]) -> Path:
    """Write `report/evals.json` and the frontier plots (evals.write_report), plus the suite's
    `summary.txt` table and `heatmap.png` (layers x sites of L0, FVU and delta LM loss)."""
    from gemmascope.evals import format_table, write_report

    results = [json.loads((f / "eval.json").read_text()) for f in folders]
    report = write_report(run_dir, results)
    (report / "summary.txt").write_text(format_table(results) + "\n")
    plot_heatmap(results, report / "heatmap.png")
    return report


def _cell_metrics(result: dict[str, Any]) -> tuple[str, int, dict[str, float]]:
    from gemmascope.evals import summary

    row = summary(result)
    site = result.get("sae_cfg", {}).get("site", "")
    kind, layer = site.rsplit(".", 1)
    return kind, int(layer), row


def plot_heatmap(results: Sequence[dict[str, Any]], path: Path) -> Path:
    """A layers x sites heatmap of L0, FVU and delta LM loss. Where a cell has several SAEs it
    shows the widest, and of those the one with the median L0, so each cell is one real SAE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells: dict[tuple[str, int], list[dict[str, float]]] = {}
    for result in results:
        kind, layer, row = _cell_metrics(result)
        cells.setdefault((kind, layer), []).append(row)
    kinds = [k for k in SITE_KINDS if any(c[0] == k for c in cells)]
    layers = sorted({c[1] for c in cells})
    metrics = [("l0", "L0"), ("fvu", "FVU"), ("delta_lm_loss", "ΔLM loss")]
    fig, axes = plt.subplots(
        1, 3, figsize=(4 + 1.2 * len(kinds) * 3, 1.5 + 0.35 * len(layers)), squeeze=False
    )
    for ax, (key, title) in zip(axes[0], metrics, strict=True):
        grid = np.full((len(layers), len(kinds)), np.nan)
        for (kind, layer), rows in cells.items():
            widest = max(r.get("d_sae", 0) for r in rows)
            rows = sorted((r for r in rows if r.get("d_sae", 0) == widest), key=lambda r: r.get("l0", 0))
            grid[layers.index(layer), kinds.index(kind)] = rows[len(rows) // 2].get(key, np.nan)
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(kinds)), kinds, rotation=30)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_ylabel("layer")
        ax.set_title(title)
        for i in range(len(layers)):
            for j in range(len(kinds)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The demo


def showcase_features(db_path: Path, sae_id: str, n: int = 3, candidates: int = 400) -> list[dict[str, Any]]:
    """Pick `n` latents that read well in a terminal: not rare, not dense, and whose top windows
    mostly fire on the same token (a plainly interpretable latent). Returns their feature records."""
    from collections import Counter

    from gemmascope.features import FeatureIndex

    index = FeatureIndex(db_path)
    d_sae = int(next(s for s in index.saes() if s["sae_id"] == sae_id)["d_sae"])
    scored: list[tuple[float, int]] = []
    seen_tokens: set[str] = set()
    for i in range(min(d_sae, candidates)):
        feature = index.feature(sae_id, i)
        examples = feature.get("top_examples") or []
        if not 1e-4 <= float(feature.get("density") or 0) <= 0.05 or len(examples) < 5:
            continue
        focus = Counter(e["tokens"][e["focus"]].strip().lower() for e in examples)
        token, count = focus.most_common(1)[0]
        scored.append((count / len(examples) + 0.01 * len(token), i))
    picked = []
    for _score, i in sorted(scored, reverse=True):
        feature = index.feature(sae_id, i)
        examples = feature["top_examples"]
        token = examples[0]["tokens"][examples[0]["focus"]].strip().lower()
        if token in seen_tokens:
            continue
        seen_tokens.add(token)
        picked.append(feature)
        if len(picked) == n:
            break
    return picked


def format_window(example: dict[str, Any]) -> str:
    """One top-activating window as text, the activating token in [[brackets]]."""
    parts = []
    for j, tok in enumerate(example["tokens"]):
        parts.append(f"[[{tok}]]" if j == example["focus"] else tok)
    return "".join(parts).replace("\n", " ")


def run_demo(
    run_dir: Path | str,
    plan: SuitePlan,
    serve: bool = True,
    host: str = "127.0.0.1",
    port: int = 8000,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The whole loop on one site: harvest, train one JumpReLU SAE, evaluate, index; print the eval
    table and three features with their top text; then serve the web UI (unless `serve` is False)."""
    from gemmascope.evals import format_table
    from gemmascope.formats import sae_id

    run_dir = Path(run_dir)
    started = time.monotonic()
    out = run_suite(run_dir, plan, say=say)
    folder = out["saes"][0]
    say("\n" + format_table(out["results"]))
    key = sae_id(folder)
    features = showcase_features(run_dir / "features.sqlite", key)
    say(f"\nThree features of {key} and where they fire most:")
    for feature in features:
        say(
            f"\n  feature {feature['index']}  (density {feature['density']:.2e}, max activation {feature['max_act']:.1f})"
        )
        if feature.get("explanation"):
            say(f"  explanation: {feature['explanation']}")
        for example in feature["top_examples"][:3]:
            say(f"    {max(example['acts']):6.1f}  {format_window(example)}")
    say(f"\ndemo finished in {time.monotonic() - started:.0f} s; run folder {run_dir}")
    out["showcase"] = features
    if serve:
        from gemmascope.server.app import serve as serve_ui

        say(f"serving the web UI at http://{host}:{port}/  (Ctrl-C to stop)")
        serve_ui(run_dir, host=host, port=port)
    return out
