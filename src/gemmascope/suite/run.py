"""Running a suite (`run_suite`): the order of the stages (harvest once, then per layer train and
evaluate, then index, the replacement model and report), `suite.json` (which stages are finished and
for which sites and SAEs, so a stage is never done by name alone), resuming a stopped suite without
redoing finished work, the time budget, and the suite report. What a suite is asked and every check
of it is `plan.py`'s.

Calls only the public functions of the pipeline modules; knows nothing of their internals.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gemmascope.errors import StoreError
from gemmascope.models import LanguageModel, load_model
from gemmascope.runs import (
    ACTIVATIONS,
    EVAL_FILE,
    FEATURES_DB,
    HELDOUT,
    MANIFEST,
    REPLACEMENT_JSON,
    REPORT,
    SUITE_JSON,
    lock,
    read_json,
    sae_id,
    stored_path,
    write_atomic,
)
from gemmascope.sae import architecture
from gemmascope.sites import Site, parse_site
from gemmascope.suite.plan import (
    SuitePlan,
    check_for_model,
    layer_specs,
    reconcile_plan,
    record_plan,
    site_kinds,
)

CLT_JSON = "clt.json"  # in report/: each CLT's held-out figures and replacement model

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
        layers = check_for_model(model, asked, plan)
        record_plan(run_dir, plan)  # only a plan that passed every check is recorded
        try:
            folders = _run_stages(run_dir, plan, model, layers, state, max_minutes, say)
        except BudgetReached as stop:
            say(
                f"time budget of {max_minutes:g} min reached before stage {stop}; "
                "re-run the same command to continue"
            )
            return {"complete": False, "stopped_before": str(stop)}
        results = [read_json(f / EVAL_FILE, "eval result") for f in folders]
        report = state.get("report", _rel(run_dir, folders), str) if folders else f"{REPORT}/{CLT_JSON}"
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
    harvest (the sites), train and eval per layer (the SAEs), index, the replacement model and report
    (all SAEs). Returns the SAE folders of the plan."""
    run = _Stages(run_dir, plan, model, state, max_minutes, say)
    sites = [Site(kind, layer) for layer in layers for kind in site_kinds(plan)]
    trained = {layer: _trained(state, layer) for layer in layers}
    todo = {layer: [s for s in layer_specs(plan, layer) if s.name not in trained[layer]] for layer in layers}
    run.harvest(sites, todo)
    folders: list[Path] = []
    for layer in layers:
        folders += run.layer(layer, [s for s in sites if s.layer == layer], trained[layer], todo[layer])
    for f in folders:
        read_json(f / EVAL_FILE, "eval result")  # a damaged one is named before any stage reads it
    if "clt" in plan.transcoders:
        run.clts()
    if folders:
        run.summarise(folders)
    return folders


class _Stages:
    """One run of the stages: what they share (the run folder, the plan, the model, `suite.json`),
    and the clock of the time budget (no stage starts once it is spent)."""

    def __init__(self, run_dir: Path, plan: SuitePlan, model: LanguageModel, state: _State,
                 max_minutes: float | None, say: Callable[[str], None]) -> None:  # fmt: skip
        self.run_dir, self.plan, self.model, self.state = run_dir, plan, model, state
        self.max_minutes, self.say = max_minutes, say
        self.started = time.monotonic()
        self._reader: LanguageModel | None = None

    @property
    def reader(self) -> LanguageModel:
        """The model for the passes that only read activations (harvest, index), in the plan's
        `model_dtype` (a rounded copy, made once); evaluations and fine-tunes use `model`."""
        if self._reader is None:
            from gemmascope.models import reading_dtype

            self._reader = self.model.cast(reading_dtype(self.plan.model_dtype, self.model.device))
        return self._reader

    def stage(self, name: str) -> None:
        """Start stage `name` (BudgetReached when the budget is spent)."""
        if self.max_minutes is not None and time.monotonic() - self.started > 60 * self.max_minutes:
            raise BudgetReached(name)
        self.say(f"== {name}")

    def harvest(self, sites: list[Site], todo: dict[int, list[Any]]) -> None:
        """Harvest the sites not harvested yet, and those of a layer with SAEs still to train whose
        activations are gone (dropped); and a slice of the held-out split for each."""
        from gemmascope.activations import harvest
        from gemmascope.train.recipe import HELDOUT_TOKENS

        run_dir, plan, model = self.run_dir, self.plan, self.reader
        harvest_key = {"tokens": plan.tokens, "dtype": plan.dtype}
        harvested = self.state.get("harvest", harvest_key, list) or []
        missing = [
            s for s in sites
            if str(s) not in harvested
            or (todo[s.layer] and not (run_dir / ACTIVATIONS / s.folder / MANIFEST).exists())
        ]  # fmt: skip
        if not missing:
            return
        self.stage("harvest")
        harvest(
            model, missing, run_dir, plan.tokens, corpus=plan.corpus, context_len=plan.context_len,
            dtype=plan.dtype,
        )  # fmt: skip
        # a slice of the held-out split: training names each SAE by its L0 there (train.recipe.HELDOUT_TOKENS)
        harvest(
            model, missing, run_dir / HELDOUT, HELDOUT_TOKENS, corpus=plan.corpus, split="heldout",
            context_len=plan.context_len, dtype=plan.dtype,
        )  # fmt: skip
        self.state.finish("harvest", sorted(set(harvested) | {str(s) for s in sites}), harvest_key)
        self._reader = None  # not held through training and evaluation: the index casts again

    def layer(self, layer: int, sites: list[Site], trained: dict[str, str], todo: list[Any]) -> list[Path]:
        """Train (and fine-tune) the layer's SAEs still to train, then evaluate those not evaluated;
        `trained` (spec name -> folder) is updated. Returns the layer's SAE folders."""
        run_dir, plan, state = self.run_dir, self.plan, self.state
        if todo:
            self.stage(f"train/layer_{layer}")
            names = [s.name for s in todo]
            name = f"layer_{layer}" if not trained else f"layer_{layer}_{_digest(names)}"
            new = _train_layer(run_dir, plan, todo, name)
            if plan.finetune_tokens:
                new = [_finetuned(self.model, folder, plan, self.say) for folder in new]
            trained.update(zip(names, _rel(run_dir, new), strict=True))
            state.finish(f"train/layer_{layer}", {"specs": trained})
            if not plan.keep_activations:
                _drop_activations(run_dir, sites)
        folders = [run_dir / trained[s.name] for s in layer_specs(plan, layer)]
        evaluated = state.get(f"eval/layer_{layer}", kind=list) or []
        unevaluated = [f for f in folders if str(f.relative_to(run_dir)) not in evaluated]
        if unevaluated:
            self.stage(f"eval/layer_{layer}")
            _evaluate_layer(run_dir, plan, self.model, unevaluated)
            state.finish(f"eval/layer_{layer}", sorted(set(evaluated) | set(_rel(run_dir, unevaluated))))
        return folders

    def clts(self) -> None:
        """One cross-layer transcoder per (width, target L0, penalty) from the harvest of every
        layer's MLP (`train.clt.train_clt`, resumed per CLT), the feature index of their layers
        (`index_clts`), then the replacement model of each, with every MLP replaced
        (`evals.evaluate_replacement`), written to `report/clt.json`."""
        from gemmascope.evals import evaluate_replacement
        from gemmascope.formats.clt import load_clt
        from gemmascope.train.clt import CLTSpec, train_clt

        run_dir, plan, state = self.run_dir, self.plan, self.state
        rows = []
        tokens = plan.train_tokens or plan.tokens
        key = {"tokens": tokens, "seed": plan.seed, "batch_size": plan.batch_size}
        for width, target, penalty in itertools.product(plan.widths, plan.target_l0s, plan.clt_penalties):
            name = f"clt/width_{width}/target_{target:g}" + ("" if penalty == "l0" else f"/{penalty}")
            folder = state.get(name, key, str)
            if folder is None:
                self.stage(f"train/{name}")
                spec = CLTSpec(
                    width=width, target_l0=target, tokens=tokens, seed=plan.seed, penalty=penalty,
                    batch_size=plan.batch_size or CLTSpec.batch_size,
                )  # fmt: skip
                folder = _rel(run_dir, [train_clt(run_dir, spec, restart=True)])[0]
                state.finish(name, folder, key)
            rows.append(folder)
        index_key = {"clts": rows, "tokens": plan.index_tokens}
        if state.get("clt_index", index_key) is None:  # feature pages of every CLT layer's latents
            self.stage("clt_index")
            index_clts(run_dir, self.model, self.reader, plan.index_tokens, plan.corpus, plan.context_len)
            state.finish("clt_index", True, index_key)
        eval_key = {"clts": rows, "tokens": plan.eval_tokens}
        if state.get("clt_replacement", eval_key) is None:
            self.stage("clt_replacement")
            results = []
            for folder in rows:
                clt = load_clt(run_dir / folder)
                result = evaluate_replacement(
                    self.model,
                    clt,
                    n_tokens=plan.eval_tokens,
                    corpus=plan.corpus,
                    context_len=plan.context_len,
                )
                results.append(
                    {"clt": folder, "heldout": clt.cfg.extra.get("heldout"), "replacement": result}
                )
                self.say(
                    f"CLT {folder}: every MLP replaced, LM loss {result['ce_loss_without']:.3f} -> "
                    f"{result['ce_loss_with']:.3f} (ΔLM {result['delta_lm_loss']:.3f}, CE recovered "
                    f"{result['ce_recovered']:.3f})"
                )
            write_atomic(run_dir / REPORT / CLT_JSON, json.dumps(results, indent=2))
            state.finish("clt_replacement", True, eval_key)

    def summarise(self, folders: list[Path]) -> None:
        """The stages over every SAE: the feature index, the replacement model's loss (with a
        transcoder per layer) and the report."""
        run_dir, plan, model, state = self.run_dir, self.plan, self.model, self.state
        index_key = {"saes": _rel(run_dir, folders), "tokens": plan.index_tokens}
        if state.get("index", index_key) is None:
            self.stage("index")
            _index(run_dir, plan, self.model, self.reader, folders)
            state.finish("index", True, index_key)
        replacement = _replacement_set(run_dir, folders, model) if plan.transcoders else []
        replacement_key = {"transcoders": _rel(run_dir, replacement), "tokens": plan.eval_tokens}
        if replacement and state.get("replacement", replacement_key) is None:
            self.stage("replacement")
            _evaluate_replacement(run_dir, plan, model, replacement, self.say)
            state.finish("replacement", True, replacement_key)
        if state.get("report", _rel(run_dir, folders), str) is None:
            self.stage("report")
            report = write_suite_report(run_dir, folders)
            state.finish("report", str(report.relative_to(run_dir)), _rel(run_dir, folders))


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
    from gemmascope.formats import load_sae

    saes = {sae_id(f): load_sae(f) for f in folders}
    results = evaluate(
        model, saes, n_tokens=plan.eval_tokens, corpus=plan.corpus, context_len=plan.context_len
    )
    for folder, result in zip(folders, results, strict=True):
        write_eval(folder, result)


def _index(
    run_dir: Path, plan: SuitePlan, model: LanguageModel, reader: LanguageModel, folders: Sequence[Path]
) -> None:
    from gemmascope.features import build_index
    from gemmascope.formats import load_sae

    saes = {sae_id(f): load_sae(f) for f in folders}
    build_index(
        model,
        saes,
        run_dir / FEATURES_DB,
        n_tokens=plan.index_tokens,
        corpus=plan.corpus,
        context_len=plan.context_len,
        reader=reader,
    )


def index_clts(
    run_dir: Path, model: LanguageModel, reader: LanguageModel, n_tokens: int, corpus: str, context_len: int
) -> list[str]:
    """Index every layer of the run's CLTs as a dictionary of its own (`opening.open_run` with
    `clt_layers`: `clt.layer_sae`) into the run's feature index, beside its SAEs, so graph nodes
    open feature pages and carry explanations. Layers the index already holds from these very
    weights are kept. Returns the ids indexed now."""
    from gemmascope.features import build_index
    from gemmascope.opening import open_run

    opened = open_run(run_dir, [], model=model, clt_layers=True)
    todo = {key: sae for key, sae in opened.saes.items() if opened.not_indexed(key) is not None}
    if todo:
        build_index(
            model, todo, run_dir / FEATURES_DB, n_tokens=n_tokens, corpus=corpus, context_len=context_len,
            folders={key: stored_path(run_dir, opened.folders[key]) for key in todo}, reader=reader,
        )  # fmt: skip
    return list(todo)


# ---------------------------------------------------------------------------------------------
# Summary


def write_suite_report(run_dir: Path, folders: Sequence[Path]) -> Path:
    """Write the run's report from the eval results of `folders` (`evals.write_report`: evals.json,
    the frontier plots, `summary.txt` with the replacement model's loss, `heatmap.png`)."""
    from gemmascope.evals import write_report

    return write_report(run_dir, [read_json(f / EVAL_FILE, "eval result") for f in folders])
