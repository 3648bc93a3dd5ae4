"""A suite's plan (`SuitePlan`) and its checks. Owns what a suite is asked to train, parsing the L0
targets and layers the command line names, every check of a plan before anything is written or run
(`SuitePlan.check`: types, finite numbers, ranges; `check_for_model`: the model's layers, the asked
ones too, and enough held-out tokens to evaluate on), `run.json` (what was asked: `reconcile_plan`
refuses a re-run with another plan, naming the difference, or extends the recorded plan with
`extend`; `record_plan` writes only a plan that passed every check; a recorded plan no plan can have
is named as damaged) and the SAEs a plan trains at a layer (`layer_specs`).

Calls only the public functions of the pipeline modules; knows nothing of their internals.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gemmascope import __version__
from gemmascope.corpus import DEFAULT_CORPUS
from gemmascope.errors import ConfigError, StoreError
from gemmascope.models import BUNDLED_MODEL, LanguageModel
from gemmascope.runs import RUN_JSON, read_json, write_atomic
from gemmascope.sae import architecture
from gemmascope.sites import SITE_KINDS, Site
from gemmascope.values import check_fields

# Gemma Scope 2 names its SAEs by L0 band: small 10-20, medium 30-60, big 90-150 (RECIPE 2,
# "L0 control"). A name asks for the middle of its band as the target L0.
L0_BANDS = {"small": 15.0, "medium": 45.0, "big": 120.0}
SUITE_KINDS = tuple(k for k in SITE_KINDS if k != "mlp_in")  # a suite's default: all but the transcoder input
# Gemma Scope 2's transcoders (mlp_in.L -> mlp_out.L): without ("plain") and with ("skip") the affine
# skip connection, one per layer; "clt": one cross-layer transcoder over every layer (clt.py).
TRANSCODER_KINDS = ("plain", "skip", "clt")


@dataclass
class SuitePlan:
    """What a suite trains. `target_l0s` (Gemma Scope 2's target-L0 mode) or `l0_coeffs` (fixed
    lambdas, Gemma Scope's sweep) choose the sparsity of each SAE; every (site, width, sparsity)
    triple is one SAE. `tokens` activations are harvested per site and each SAE trains on
    `train_tokens` of them (several epochs when larger). `transcoders` adds, per layer, one
    transcoder per (kind, width, sparsity) from the MLP's input to its output (harvested with the
    other sites, in the same pass), and the report then gives the replacement model's loss (every
    layer's MLP replaced at once); its kind "clt" trains instead one cross-layer transcoder per
    (width, sparsity) over every layer, from the same harvest, measured the same way."""

    model: str = BUNDLED_MODEL
    kinds: list[str] = field(default_factory=lambda: list(SUITE_KINDS))
    layers: list[int] | None = None  # None: every layer of the model
    widths: list[int] = field(default_factory=lambda: [4096])
    target_l0s: list[float] = field(default_factory=lambda: [L0_BANDS["medium"]])
    l0_coeffs: list[float] = field(default_factory=list)
    architecture: str = "jumprelu"
    transcoders: list[str] = field(default_factory=list)  # some of TRANSCODER_KINDS
    clt_penalties: list[str] = field(default_factory=lambda: ["l0"])  # one CLT each (train.clt.CLT_PENALTIES)
    tokens: int = 200_000
    train_tokens: int | None = None  # None: `tokens`
    finetune_tokens: int = 0  # > 0: each SAE then fine-tuned end to end on this many tokens (train/)
    eval_tokens: int = 8_192
    index_tokens: int = 16_384
    context_len: int = 128
    corpus: str = DEFAULT_CORPUS
    dtype: str = "float32"
    model_dtype: str = "auto"  # of the harvest's and index's passes (models.reading_dtype); evals: float32
    seed: int = 0
    fast: bool = True
    batch_size: int | None = None  # None: the trainer's short-run default
    keep_activations: bool = True

    def check(self) -> None:
        """Every value of the plan of its type and in range (numbers finite), before anything is
        written or run; the model-dependent checks follow in `check_for_model`."""
        from gemmascope.activations import dtype_name
        from gemmascope.evals.core import MIN_EVAL_TOKENS
        from gemmascope.models import reading_dtype
        from gemmascope.train.clt import CLT_PENALTIES

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
        bad = [k for k in self.clt_penalties if k not in CLT_PENALTIES]
        if bad or not self.clt_penalties:
            raise ConfigError(
                f"CLT penalties {self.clt_penalties}: expected some of {', '.join(CLT_PENALTIES)}"
            )
        dtype_name(self.dtype)
        reading_dtype(self.model_dtype)
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
        layer_specs(self, 0)  # its architecture exists and takes these sparsities


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


# Fields of a plan that name the run folder's model and text: never changed, even with --extend.
_IDENTITY = ("model", "corpus", "context_len")
# Fields --extend adds to (the union of the old and the new); every other field must match.
_EXTENSIBLE = ("kinds", "layers", "widths", "target_l0s", "l0_coeffs", "transcoders", "clt_penalties")
_FREE = ("keep_activations", "model_dtype")  # may differ from run to run


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


def check_for_model(model: LanguageModel, asked: SuitePlan, plan: SuitePlan) -> list[int]:
    """The layers `plan` (the one `reconcile_plan` returned for `asked`) covers on `model`, after
    the checks that need the model: every layer of both plans within the model's (--extend would
    absorb an asked one into a recorded 'all'), and enough held-out tokens to evaluate on."""
    layers = plan.layers if plan.layers is not None else list(range(model.n_layers))
    for layer in [*(asked.layers or []), *layers]:
        if not 0 <= layer < model.n_layers:
            raise ConfigError(f"layer {layer} is out of range: valid layers are 0..{model.n_layers - 1}")
    if "clt" in plan.transcoders and layers != list(range(model.n_layers)):
        raise ConfigError(
            f"a cross-layer transcoder spans every layer; the plan covers layers {layers} of {model.n_layers}: "
            "use --layers all"
        )
    _check_eval_set(model, plan)
    return layers


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


def record_plan(run_dir: Path, plan: SuitePlan) -> None:
    """Record what was asked in `run.json` (the plan `reconcile_plan` returned, once every check
    passed)."""
    write_atomic(
        run_dir / RUN_JSON, json.dumps({"gemmascope_version": __version__, **asdict(plan)}, indent=2)
    )


def site_kinds(plan: SuitePlan) -> list[str]:
    """The site kinds a plan harvests: its SAEs' and, with transcoders, the MLP's input and output."""
    extra = ["mlp_in", "mlp_out"] if plan.transcoders else []
    return plan.kinds + [k for k in extra if k not in plan.kinds]


def layer_specs(plan: SuitePlan, layer: int) -> list[Any]:
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
    for kind in (k for k in plan.transcoders if k != "clt"):  # a CLT is no layer's (suite.run)
        for width in plan.widths:
            specs += sparsities(mlp_in, width, out_site=mlp_out, skip=kind == "skip")
    return specs
