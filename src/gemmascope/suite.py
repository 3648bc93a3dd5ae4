"""The main job: a Gemma Scope-like suite of SAEs in one run folder. Owns `run.json`
(what was asked: a re-run with another plan is refused with the difference, or extends the recorded
plan with `extend`), `suite.json` (which stages are finished and for which sites and SAEs, so a stage
is never done by name alone), the order of the stages (harvest once, then per layer train and
evaluate, then index and report), resuming a stopped suite without redoing finished work, the time
budget, and the suite summary (table and layers x sites heatmap PNG). The demo that runs it on one
site lives in `demo.py`.

Calls only the public functions of the pipeline modules; knows nothing of their internals.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gemmascope import __version__
from gemmascope.corpus import DEFAULT_CORPUS
from gemmascope.errors import ConfigError, StoreError
from gemmascope.models import BUNDLED_MODEL, LanguageModel, load_model
from gemmascope.runs import (
    ACTIVATIONS,
    EVAL_FILE,
    FEATURES_DB,
    HELDOUT,
    MANIFEST,
    REPLACEMENT_JSON,
    REPORT,
    RUN_JSON,
    SUITE_JSON,
    lock,
    read_json,
    write_atomic,
)
from gemmascope.sae import architecture
from gemmascope.sites import SITE_KINDS, Site, parse_site
from gemmascope.values import check_fields

# Gemma Scope 2 names its SAEs by L0 band: small 10-20, medium 30-60, big 90-150 (RECIPE 2,
# "L0 control"). A name asks for the middle of its band as the target L0.
L0_BANDS = {"small": 15.0, "medium": 45.0, "big": 120.0}
SUITE_KINDS = tuple(k for k in SITE_KINDS if k != "mlp_in")  # a suite's default: all but the transcoder input
# Gemma Scope 2's transcoders (mlp_in.L -> mlp_out.L): without ("plain") and with ("skip") the affine
# skip connection.
TRANSCODER_KINDS = ("plain", "skip")


@dataclass
class SuitePlan:
    """What a suite trains. `target_l0s` (Gemma Scope 2's target-L0 mode) or `l0_coeffs` (fixed
    lambdas, Gemma Scope's sweep) choose the sparsity of each SAE; every (site, width, sparsity)
    triple is one SAE. `tokens` activations are harvested per site and each SAE trains on
    `train_tokens` of them (several epochs when larger). `transcoders` adds, per layer, one
    transcoder per (kind, width, sparsity) from the MLP's input to its output (harvested with the
    other sites, in the same pass), and the report then gives the replacement model's loss (every
    layer's MLP replaced at once)."""

    model: str = BUNDLED_MODEL
    kinds: list[str] = field(default_factory=lambda: list(SUITE_KINDS))
    layers: list[int] | None = None  # None: every layer of the model
    widths: list[int] = field(default_factory=lambda: [4096])
    target_l0s: list[float] = field(default_factory=lambda: [L0_BANDS["medium"]])
    l0_coeffs: list[float] = field(default_factory=list)
    architecture: str = "jumprelu"
    transcoders: list[str] = field(default_factory=list)  # some of TRANSCODER_KINDS
    tokens: int = 200_000
    train_tokens: int | None = None  # None: `tokens`
    finetune_tokens: int = 0  # > 0: each SAE then fine-tuned end to end on this many tokens (train/)
    eval_tokens: int = 8_192
    index_tokens: int = 16_384
    context_len: int = 128
    corpus: str = DEFAULT_CORPUS
    dtype: str = "float32"
    seed: int = 0
    fast: bool = True
    batch_size: int | None = None  # None: the trainer's short-run default
    keep_activations: bool = True

    def check(self) -> None:
        """Every value of the plan of its type and in range (numbers finite), before anything is
        written or run; the model-dependent checks follow in `run_suite`."""
        from gemmascope.activations import dtype_name
        from gemmascope.evals.core import MIN_EVAL_TOKENS

        check_fields(self, "suite plan")
        bad = [k for k in self.kinds if k not in SITE_KINDS]
        if bad or not (self.kinds or self.transcoders):
            raise ConfigError(
                f"unknown site kinds {bad or self.kinds}: expected some of {', '.join(SITE_KINDS)}"
                + ("" if bad else " (or transcoders)")
            )
        bad = [k for k in self.transcoders if k not in TRANSCODER_KINDS]
        if bad:
            raise ConfigError(
                f"unknown transcoder kinds {bad}: expected some of {', '.join(TRANSCODER_KINDS)}"
            )
        dtype_name(self.dtype)
        if not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError(f"widths {self.widths} must be positive integers")
        if not self.target_l0s and not self.l0_coeffs:
            raise ConfigError("give target L0s (e.g. small,medium,big or numbers) or lambdas (--l0-coeffs)")
        if any(t <= 0 for t in self.target_l0s) or any(c < 0 for c in self.l0_coeffs):
            raise ConfigError(f"target L0s {self.target_l0s} must be > 0 and lambdas {self.l0_coeffs} >= 0")
        least = {"tokens": 1, "train_tokens": 1, "finetune_tokens": 0, "eval_tokens": MIN_EVAL_TOKENS,
                 "index_tokens": 1, "context_len": 2, "batch_size": 1}  # fmt: skip
        for name, low in least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{name} {value} must be at least {low}")
        if any(layer < 0 for layer in self.layers or []):
            raise ConfigError(f"layers {self.layers} must be >= 0")
        _layer_specs(self, 0)  # its architecture exists and takes these sparsities


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
            if not 0 < value < math.inf:
                raise ConfigError(f"L0 target {part!r} must be a positive number")
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
    """`suite.json`: the finished stages and what each covered (sites, SAEs, settings), written
    atomically after each. A stage is done only for the work it recorded, never by name alone."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / SUITE_JSON
        self.data: dict[str, Any] = (
            read_json(self.path, "suite state") if self.path.exists() else {"done": {}}
        )
        if not isinstance(self.data.get("done"), dict):
            raise StoreError(f"suite state {str(self.path)!r} is damaged: it lacks its 'done' object")

    def get(self, stage: str, key: Any = None, kind: type = object) -> Any:
        """What a finished stage recorded, when it was finished with this `key`; None otherwise. A
        value not of `kind` (a list: of names) is a damaged file, named, never a crash later."""
        entry = self.data["done"].get(stage)
        if not isinstance(entry, dict) or "value" not in entry or entry.get("key") != key:
            return None
        value = entry["value"]
        if not isinstance(value, kind) or (
            isinstance(value, list) and kind is list and not all(isinstance(v, str) for v in value)
        ):
            raise StoreError(
                f"suite state {str(self.path)!r} is damaged: stage {stage!r} records {str(value)[:60]!r}, "
                f"expected a {kind.__name__}{' of names' if kind is list else ''}; restore or delete it "
                "(its stages then run again, reusing finished work)"
            )
        return value

    def finish(self, stage: str, value: Any, key: Any = None) -> None:
        self.data["done"][stage] = {"key": key, "value": value}
        write_atomic(self.path, json.dumps(self.data, indent=2))


# Fields of a plan that name the run folder's model and text: never changed, even with --extend.
_IDENTITY = ("model", "corpus", "context_len")
# Fields --extend adds to (the union of the old and the new); every other field must match.
_EXTENSIBLE = ("kinds", "layers", "widths", "target_l0s", "l0_coeffs", "transcoders")
_FREE = ("keep_activations",)  # may differ from run to run


def reconcile_plan(run_dir: Path | str, plan: SuitePlan, extend: bool = False) -> SuitePlan:
    """The plan to run in `run_dir`: `plan` itself for a new folder or the same plan; with `extend`,
    the recorded plan extended by this one's sites, layers, widths and L0s. A plan that differs from
    the recorded one is refused with the difference (a StoreError), so a run folder never claims work
    it does not hold. Writes nothing."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_JSON
    if not path.exists():
        return plan
    old = _recorded_plan(path)
    asked = asdict(plan)
    for key in _IDENTITY:
        if old.get(key) != asked[key]:
            raise StoreError(
                f"run folder {run_dir} was made with {key}={old.get(key)!r}, not {asked[key]!r}; "
                "use another folder"
            )
    diffs = [k for k in asked if k in old and k not in _FREE and old[k] != asked[k]]
    if not diffs:
        return plan
    said = "; ".join(f"{k} {old[k]!r} (recorded) vs {asked[k]!r} (asked)" for k in diffs)
    fixed = [k for k in diffs if k not in _EXTENSIBLE]
    if not extend or fixed:
        hint = (
            f"--extend adds sites, layers, widths and L0s but cannot change {', '.join(fixed)}"
            if extend
            else "re-run with the recorded plan, pass --extend to add to it, or use another folder"
        )
        raise StoreError(f"run folder {run_dir} holds another plan: {said}; {hint}")
    merged = dict(asked)
    for key in diffs:
        if old[key] is None or asked[key] is None:  # layers: None is every layer
            merged[key] = None
        elif not isinstance(old[key], list):
            raise StoreError(f"run description {str(path)!r} is damaged: {key} {old[key]!r} is not a list")
        else:
            merged[key] = old[key] + [v for v in asked[key] if v not in old[key]]
    return SuitePlan(**merged)


def _recorded_plan(path: Path) -> dict[str, Any]:
    """The plan run.json records, checked as a new one is: a value no plan can have (NaN, a wrong
    type, a width of 0) is a damaged file, named, never "another plan" the folder is stuck with."""
    old = read_json(path, "run description")
    names = {f.name for f in fields(SuitePlan)}
    try:
        SuitePlan(**{k: v for k, v in old.items() if k in names}).check()
    except (ConfigError, TypeError) as err:
        raise StoreError(
            f"run description {str(path)!r} is damaged ({err}); delete it and re-run to record this "
            "command's plan (finished stages are kept)"
        ) from None
    return old


def _check_eval_set(model: LanguageModel, plan: SuitePlan) -> None:
    """Enough held-out tokens to evaluate on, found before anything is harvested (the evaluation
    itself would only find out after training)."""
    from gemmascope.corpus import special_mask
    from gemmascope.evals.core import MIN_EVAL_TOKENS, eval_token_ids

    rows = eval_token_ids(model, plan.eval_tokens, plan.corpus, context_len=plan.context_len)
    n_eval = int((~special_mask(rows, model.special_token_ids)).sum())
    if n_eval < MIN_EVAL_TOKENS:
        raise ConfigError(
            f"eval_tokens {plan.eval_tokens} gives {n_eval} held-out tokens besides BOS/EOS; the evaluation "
            f"needs at least {MIN_EVAL_TOKENS}: ask for more (--eval-tokens)"
        )


def _write_run_json(run_dir: Path, plan: SuitePlan) -> None:
    """Record what was asked (the plan `reconcile_plan` returned)."""
    write_atomic(
        run_dir / RUN_JSON, json.dumps({"gemmascope_version": __version__, **asdict(plan)}, indent=2)
    )


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
    extend: bool = False,
) -> dict[str, Any]:
    """Run (or resume) a suite in `run_dir`: harvest every site once, then per layer train and
    evaluate its SAEs, then build the feature index and the report. Finished work is skipped; a plan
    other than the recorded one is refused unless `extend` (see `reconcile_plan`). With `max_minutes`,
    no new stage starts once the budget is spent (re-run to continue). Holds the run folder's lock.
    Returns the summary (`complete`, `saes`, `results`, `report`)."""
    run_dir = Path(run_dir)
    plan.check()
    with lock(run_dir, "suite"):
        asked, plan = plan, reconcile_plan(run_dir, plan, extend)
        state = _State(run_dir)
        model = model or load_model(plan.model)
        layers = plan.layers if plan.layers is not None else list(range(model.n_layers))
        for layer in [*(asked.layers or []), *layers]:  # the asked ones too: --extend would absorb them
            if not 0 <= layer < model.n_layers:
                raise ConfigError(f"layer {layer} is out of range: valid layers are 0..{model.n_layers - 1}")
        _check_eval_set(model, plan)
        _write_run_json(run_dir, plan)  # only a plan that passed every check is recorded
        try:
            folders = _run_stages(run_dir, plan, model, layers, state, max_minutes, say)
        except BudgetReached as stop:
            say(
                f"time budget of {max_minutes:g} min reached before stage {stop}; "
                "re-run the same command to continue"
            )
            return {"complete": False, "stopped_before": str(stop)}
        results = [read_json(f / EVAL_FILE, "eval result") for f in folders]
        report = state.get("report", _rel(run_dir, folders), str)
        return {"complete": True, "saes": folders, "results": results, "report": run_dir / report}


def _rel(run_dir: Path, folders: Sequence[Path]) -> list[str]:
    return [str(f.relative_to(run_dir)) for f in folders]


def _run_stages(
    run_dir: Path,
    plan: SuitePlan,
    model: LanguageModel,
    layers: list[int],
    state: _State,
    max_minutes: float | None,
    say: Callable[[str], None],
) -> list[Path]:
    """The stages in order, each skipped when `suite.json` records it done for this very work:
    harvest (the sites), train and eval per layer (the SAEs), index and report (all SAEs). Returns
    the SAE folders of the plan."""
    from gemmascope.activations import harvest
    from gemmascope.train.recipe import HELDOUT_TOKENS

    started = time.monotonic()

    def stage(name: str) -> None:
        if max_minutes is not None and time.monotonic() - started > 60 * max_minutes:
            raise BudgetReached(name)
        say(f"== {name}")

    sites = [Site(kind, layer) for layer in layers for kind in _site_kinds(plan)]
    harvest_key = {"tokens": plan.tokens, "dtype": plan.dtype}
    harvested = state.get("harvest", harvest_key, list) or []
    trained = {layer: _trained(state, layer) for layer in layers}
    todo = {layer: [s for s in _layer_specs(plan, layer) if s.name not in trained[layer]] for layer in layers}
    missing = [
        s for s in sites
        if str(s) not in harvested
        or (todo[s.layer] and not (run_dir / ACTIVATIONS / s.folder / MANIFEST).exists())
    ]  # fmt: skip
    if missing:
        stage("harvest")
        harvest(
            model, missing, run_dir, plan.tokens, corpus=plan.corpus, context_len=plan.context_len,
            dtype=plan.dtype,
        )  # fmt: skip
        # a slice of the held-out split: training names each SAE by its L0 there (train.recipe.HELDOUT_TOKENS)
        harvest(
            model, missing, run_dir / HELDOUT, HELDOUT_TOKENS, corpus=plan.corpus, split="heldout",
            context_len=plan.context_len, dtype=plan.dtype,
        )  # fmt: skip
        state.finish("harvest", sorted(set(harvested) | {str(s) for s in sites}), harvest_key)
    folders: list[Path] = []
    for layer in layers:
        if todo[layer]:
            stage(f"train/layer_{layer}")
            names = [s.name for s in todo[layer]]
            name = f"layer_{layer}" if not trained[layer] else f"layer_{layer}_{_digest(names)}"
            new = _train_layer(run_dir, plan, todo[layer], name)
            if plan.finetune_tokens:
                new = [_finetuned(model, folder, plan, say) for folder in new]
            trained[layer].update(zip(names, _rel(run_dir, new), strict=True))
            state.finish(f"train/layer_{layer}", {"specs": trained[layer]})
            if not plan.keep_activations:
                _drop_activations(run_dir, [s for s in sites if s.layer == layer])
        layer_folders = [run_dir / trained[layer][s.name] for s in _layer_specs(plan, layer)]
        evaluated = state.get(f"eval/layer_{layer}", kind=list) or []
        unevaluated = [f for f in layer_folders if str(f.relative_to(run_dir)) not in evaluated]
        if unevaluated:
            stage(f"eval/layer_{layer}")
            _evaluate_layer(run_dir, plan, model, unevaluated)
            state.finish(f"eval/layer_{layer}", sorted(set(evaluated) | set(_rel(run_dir, unevaluated))))
        folders += layer_folders
    for f in folders:
        read_json(f / EVAL_FILE, "eval result")  # a damaged one is named before any stage reads it
    index_key = {"saes": _rel(run_dir, folders), "tokens": plan.index_tokens}
    if state.get("index", index_key) is None:
        stage("index")
        _index(run_dir, plan, model, folders)
        state.finish("index", True, index_key)
    replacement = _replacement_set(run_dir, folders, model) if plan.transcoders else []
    replacement_key = {"transcoders": _rel(run_dir, replacement), "tokens": plan.eval_tokens}
    if replacement and state.get("replacement", replacement_key) is None:
        stage("replacement")
        _evaluate_replacement(run_dir, plan, model, replacement, say)
        state.finish("replacement", True, replacement_key)
    if state.get("report", _rel(run_dir, folders), str) is None:
        stage("report")
        report = write_suite_report(run_dir, folders)
        state.finish("report", str(report.relative_to(run_dir)), _rel(run_dir, folders))
    return folders


def _digest(names: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:8]


def _trained(state: _State, layer: int) -> dict[str, str]:
    """The SAEs a layer's training stages produced: spec name -> folder relative to the run."""
    specs = (state.get(f"train/layer_{layer}", kind=dict) or {}).get("specs", {})
    if not isinstance(specs, dict) or not all(isinstance(v, str) for v in specs.values()):
        raise StoreError(
            f"suite state {str(state.path)!r} is damaged: train/layer_{layer} lists no SAE folders"
        )
    return dict(specs)


def _site_kinds(plan: SuitePlan) -> list[str]:
    """The site kinds a plan harvests: its SAEs' and, with transcoders, the MLP's input and output."""
    extra = ["mlp_in", "mlp_out"] if plan.transcoders else []
    return plan.kinds + [k for k in extra if k not in plan.kinds]


def _layer_specs(plan: SuitePlan, layer: int) -> list[Any]:
    """The plan's SAEs at one layer, in training order: site, then width, then sparsity; then the
    transcoders (kind, width, sparsity)."""
    from gemmascope.sites import transcoder_sites
    from gemmascope.train import TrainSpec

    arch = architecture(plan.architecture)  # a target L0 is TopK's k (`Architecture.sparsity`)
    knobs = [arch.sparsity(target_l0=t) for t in plan.target_l0s] + [
        arch.sparsity(l0_coeff=c) for c in plan.l0_coeffs
    ]

    def sparsities(site: str, width: int, **how: Any) -> list[TrainSpec]:
        return [TrainSpec(site, width, plan.architecture, **knob, **how) for knob in knobs]

    specs = []
    for kind in plan.kinds:
        for width in plan.widths:
            specs += sparsities(str(Site(kind, layer)), width)
    mlp_in, mlp_out = (str(s) for s in transcoder_sites(layer))
    for kind in plan.transcoders:
        for width in plan.widths:
            specs += sparsities(mlp_in, width, out_site=mlp_out, skip=kind == "skip")
    return specs


def _replacement_set(run_dir: Path, folders: Sequence[Path], model: LanguageModel) -> list[Path]:
    """One transcoder per layer for the replacement model's loss (the first of each layer's, in the
    plan's order), or none when some layer of the model has no transcoder in the plan."""
    from gemmascope.formats import load_sae

    by_layer: dict[int, Path] = {}
    for folder in folders:
        sae = load_sae(folder)
        if sae.is_transcoder:
            by_layer.setdefault(parse_site(sae.cfg.site).layer, folder)
    return [by_layer[layer] for layer in sorted(by_layer)] if len(by_layer) == model.n_layers else []


def _train_layer(run_dir: Path, plan: SuitePlan, specs: Sequence[Any], name: str) -> list[Path]:
    from gemmascope.train import TrainConfig, train_saes

    config = TrainConfig(
        name=name, seed=plan.seed, fast=plan.fast and architecture(plan.architecture).fast_step
    )
    if plan.batch_size is not None:
        config.batch_size = plan.batch_size
    # restart: an unfinished checkpoint of this layer under another spec list (killed, then --extend)
    # is stale; one of the same specs still resumes
    return train_saes(run_dir, list(specs), plan.train_tokens or plan.tokens, config, restart=True)


def _finetuned(model: LanguageModel, folder: Path, plan: SuitePlan, say: Callable[[str], None]) -> Path:
    """The SAE or transcoder of `folder` fine-tuned end to end (`train.finetune.finetune_folder`) beside
    it; one a killed run already wrote (saved atomically) is reused, a killed fine-tune resumes."""
    from gemmascope.train.finetune import FINETUNED_SUFFIX, finetune_folder

    done = folder.with_name(folder.name + FINETUNED_SUFFIX)
    if done.exists():
        return done
    out, info = finetune_folder(model, folder, tokens=plan.finetune_tokens, corpus=plan.corpus, restart=True)
    say(f"fine-tuned {folder.name} on {info['tokens']} tokens in {info['seconds']:.0f} s")
    return out


def _evaluate_replacement(
    run_dir: Path, plan: SuitePlan, model: LanguageModel, folders: Sequence[Path], say: Callable[[str], None]
) -> None:
    """The replacement model's loss (every layer's MLP replaced by its transcoder at once), written
    to `report/replacement.json`, which the suite report reads."""
    from gemmascope.evals import evaluate_replacement
    from gemmascope.formats import load_sae

    result = evaluate_replacement(
        model, [load_sae(f) for f in folders], n_tokens=plan.eval_tokens, corpus=plan.corpus,
        context_len=plan.context_len,
    )  # fmt: skip
    result["transcoders"] = _rel(run_dir, folders)
    write_atomic(run_dir / REPORT / REPLACEMENT_JSON, json.dumps(result, indent=2))
    say(
        f"replacement model ({len(folders)} transcoders): LM loss {result['ce_loss_without']:.3f} -> "
        f"{result['ce_loss_with']:.3f} (ΔLM {result['delta_lm_loss']:.3f}, KL {result['kl_div']:.3f})"
    )


def _drop_activations(run_dir: Path, sites: Sequence[Site]) -> None:
    """Free the disk of sites whose SAEs are trained (only when the plan does not keep them)."""
    import shutil

    for site in sites:
        shutil.rmtree(run_dir / ACTIVATIONS / site.folder, ignore_errors=True)


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
        run_dir / FEATURES_DB,
        n_tokens=plan.index_tokens,
        corpus=plan.corpus,
        context_len=plan.context_len,
    )


# ---------------------------------------------------------------------------------------------
# Summary


def write_suite_report(run_dir: Path, folders: Sequence[Path]) -> Path:
    """Write the run's report from the eval results of `folders` (`evals.write_report`: evals.json,
    the frontier plots, `summary.txt` with the replacement model's loss, `heatmap.png`)."""
    from gemmascope.evals import write_report

    return write_report(run_dir, [read_json(f / EVAL_FILE, "eval result") for f in folders])
