"""What a training run asks for and every value it uses. Owns `TrainSpec` (one SAE: site, width,
architecture, sparsity), `TrainConfig` (the settings of a run; each field's metadata is its help, and
the `train` command's flags are generated from them), the checks of both, and `resolve`, the ONE
place where the settings a run leaves open (None: "the recipe's value for this optimiser and run
length") become numbers, from `recipe.SHORT_RUN` and `recipe.PUBLISHED`.

Knows nothing of the training loop, checkpoints or files; of the activation store it reads only the
manifests; of an architecture only what `sae.architecture` says (its spec check, folder tag).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from gemmascope.activations import ActivationStore
from gemmascope.architectures.jumprelu import THRESHOLD_FLOOR
from gemmascope.errors import ConfigError, StoreError
from gemmascope.models import MODEL_DTYPES, reading_dtype
from gemmascope.runs import check_name
from gemmascope.sae import architecture
from gemmascope.sites import parse_site
from gemmascope.train.recipe import (
    B_DEC_INITS,
    FINAL_FRACTION,
    OPTIMIZERS,
    PUBLISHED,
    SHORT_RUN,
    matryoshka_prefixes,
)

PARALLEL_MODES = ("data", "sae")


@dataclass
class TrainSpec:
    """One SAE to train: where it reads, how wide it is, its architecture and how its sparsity is set.

    JumpReLU takes `l0_coeff` (λ, a fixed L0 penalty) or `target_l0` (Gemma Scope 2's quadratic
    penalty around L0*); TopK and BatchTopK take `k`; ReLU takes `l0_coeff` as its L1 coefficient
    (each architecture's `knobs`). `lr` overrides the run's learning rate for this SAE.

    A transcoder reads `site` and predicts `out_site` (Gemma Scope 2: `mlp_in.L` to `mlp_out.L`,
    `sites.transcoder_sites`), with an affine skip connection when `skip`.

    With `matryoshka` the reconstruction term is the mean over nested prefixes of the dictionary
    (`recipe.matryoshka_prefixes`: the first width/16, /8, /4, /2 latents, and all), as in every Gemma
    Scope 2 model; the logged recon and FVU are then that mean, the held-out figures the whole SAE's."""

    site: str
    width: int
    architecture: str = "jumprelu"
    l0_coeff: float | None = None
    target_l0: float | None = None
    k: int | None = None
    lr: float | None = None
    out_site: str | None = None
    skip: bool = False
    matryoshka: bool = False

    @property
    def name(self) -> str:
        """A short label for logs: `resid_post.6/w4096/jumprelu/lam0.001`; a transcoder's
        `mlp_in.6>mlp_out.6/w4096/jumprelu/target45` (`+skip` with the skip connection)."""
        if self.k is not None:
            how = f"k{self.k}"
        elif self.target_l0 is not None:
            how = f"target{self.target_l0:g}"
        else:
            how = "lam" + (f"{self.l0_coeff:g}" if self.l0_coeff is not None else "?")
        where = self.site if self.out_site is None else f"{self.site}>{self.out_site}"
        kind = self.architecture + ("+skip" if self.skip else "") + ("+matryoshka" if self.matryoshka else "")
        return f"{where}/w{self.width}/{kind}/{how}"

    @property
    def sites(self) -> list[str]:
        """The sites this spec reads: its own, and a transcoder's output site."""
        return [self.site] if self.out_site is None else [self.site, self.out_site]

    @property
    def folder_kind(self) -> str:
        """What its folder name adds to `l0_K` (`runs.sae_dir`'s `kind`): the architecture's tag,
        after `matryoshka`, then `transcoder` (`skip_` first with the skip connection); "" for a
        plain JumpReLU SAE: `l0_45_topk`, `l0_45_matryoshka`, `l0_45_skip_transcoder`."""
        transcoder = self.out_site is not None
        parts = (
            "skip" if transcoder and self.skip else "",
            "matryoshka" if self.matryoshka else "",
            architecture(self.architecture).folder_tag,
            "transcoder" if transcoder else "",
        )
        return "_".join(p for p in parts if p)

    @property
    def prefixes(self) -> tuple[int, ...] | None:
        """Matryoshka's nested dictionary sizes, or None."""
        return matryoshka_prefixes(self.width) if self.matryoshka else None


def _opt(help: str, *, published: object = None, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A TrainConfig field's metadata: its help on the command line (`cli.options.add_config_flags`
    turns every field that has one into a flag), the published value and the choices."""
    return {"help": help, "published": published, "choices": choices}


_R, _P = SHORT_RUN, PUBLISHED


@dataclass
class TrainConfig:
    """Settings shared by every SAE of one training run. A field left None is worked out by `resolve`
    for the optimiser and the run length; the values used are recorded in each SAE's `cfg.extra`."""

    batch_size: int = field(
        default=_R.batch_size, metadata=_opt("activations per step", published=_P.batch_size)
    )
    optimizer: str = field(
        default=_R.optimizer,
        metadata=_opt(
            "signum: sign descent with schedule-free averaging, biases fixed; adam: every parameter, "
            "as published",
            choices=OPTIMIZERS,
        ),
    )
    lr: float | None = field(
        default=None,
        metadata=_opt(
            f"learning rate (default: {_R.lr_signum:g} with signum, {_R.lr_signum_transcoder:g} for its "
            f"transcoders; with adam {_R.lr:g}, {_R.lr_long:g} past {_R.long_run_steps} steps)",
            published=_P.lr,
        ),
    )
    threshold_lr_ratio: float = field(
        default=_R.threshold_lr_ratio, metadata=_opt("signum: the JumpReLU thresholds' lr over lr")
    )
    lr_warmup_steps: int | None = field(
        default=None,
        metadata=_opt(
            f"cosine lr warm-up from 0.1 lr (default: none with signum; with adam {_R.lr_warmup_fraction:.0%} "
            f"of the steps, at most {_P.lr_warmup_steps})",
            published=_P.lr_warmup_steps,
        ),
    )
    lr_decay_steps: int | None = field(
        default=None,
        metadata=_opt(
            "linear decay of lr to 0 over the last steps (default: none with signum; with adam "
            f"{_R.lr_decay_fraction:.0%} of the steps)"
        ),
    )
    l0_warmup_steps: int | None = field(
        default=None,
        metadata=_opt(
            f"linear warm-up of the sparsity coefficient (default: {_R.l0_warmup_fraction:.0%} of the "
            "steps: thresholds start at the target rate)",
            published=_P.l0_warmup_steps,
        ),
    )
    adam_betas: tuple[float, float] = field(
        default=_R.adam_betas, metadata=_opt("Adam's beta1,beta2", published=_P.adam_betas)
    )
    bandwidth: float = field(
        default=_R.bandwidth,
        metadata=_opt("the threshold's straight-through bandwidth", published=_P.bandwidth),
    )
    b_dec_init: str = field(
        default=_R.b_dec_init,
        metadata=_opt("mean: b_dec at the first batch's mean; zero: as published", choices=B_DEC_INITS),
    )
    threshold_init: float | None = field(
        default=None,
        metadata=_opt(
            "every JumpReLU threshold at init (default: each at its target firing rate on the first batch)",
            published=_P.threshold_init,
        ),
    )
    target_l0_coeff: float = field(
        default=_R.target_l0_coeff, metadata=_opt("coefficient of Gemma Scope 2's target-L0 penalty")
    )
    dead_preact_coeff: float | None = field(
        default=None,
        metadata=_opt(
            f"pre-activation loss on dead JumpReLU latents (default: {_R.dead_preact_coeff:g} with "
            "signum, 0 with adam; 0: off)"
        ),
    )
    dense_coeff: float | None = field(
        default=None,
        metadata=_opt(
            f"penalty on JumpReLU latents over --dense-density (default: {_R.dense_coeff:g} with signum, "
            "0 with adam; 0: off)"
        ),
    )
    dense_density: float | None = field(
        default=None,
        metadata=_opt(
            f"density over which latents are penalised (default: {_R.dense_density:g}, or "
            f"{_R.dense_density_long:g} from {_R.dense_long_tokens:,} training tokens)"
        ),
    )
    auxk_coeff: float = field(
        default=_R.auxk_coeff, metadata=_opt("TopK / BatchTopK AuxK coefficient (0: off)")
    )
    spike_factor: float = field(
        default=_R.spike_factor,
        metadata=_opt("a batch FVU over this x its running value is a spike (0: off)"),
    )
    dead_window_tokens: int | None = field(
        default=None,
        metadata=_opt(
            f"tokens a silent latent takes to count as dead (default: {_R.dead_window_tokens}, at least a "
            "batch)",
            published=_P.dead_window_tokens,
        ),
    )
    max_norm: float | None = field(
        default=_R.max_scaled_norm,
        metadata=_opt("tokens whose scaled norm ‖x/C‖ is above this are left out (none: keep all)"),
    )
    refit_tokens: int = field(
        default=_R.refit_tokens,
        metadata=_opt("tokens the decoder is refit on by least squares after training (0: off)"),
    )
    refit_dtype: str = field(
        default="auto",
        metadata=_opt(
            "dtype of the refit's encoder product: auto (bfloat16 where the device computes it natively, as "
            "--model-dtype: 1.4x faster refit, same held-out FVU to 1e-5), float32 (the codes exactly as "
            "inference computes them), bfloat16",
            choices=MODEL_DTYPES,
        ),
    )
    step_dtype: str = field(
        default="auto",
        metadata=_opt(
            "dtype of the training step's encoder product: auto (bfloat16 where the device computes it "
            "natively, as --model-dtype: the steps about 1.15x faster, the same held-out FVU with the default "
            "recipe; a smaller --bandwidth or Adam was not measured: use float32 there), float32 "
            "(the product as inference takes it), bfloat16",
            choices=MODEL_DTYPES,
        ),
    )
    seed: int = field(default=0, metadata=_opt("seed of the initialisation and the batch order"))
    buffer_tokens: int = field(default=2**18, metadata=_opt("activations shuffled together"))
    fast: bool = field(default=True, metadata=_opt("the sparse JumpReLU step (--no-fast: the plain one)"))
    parallel: str = field(
        default="data",
        metadata=_opt(
            "under torchrun: data (each process reads its slice of the store, gradients averaged; the "
            "batch size is the global one) or sae (the SAEs are spread over the processes)",
            choices=PARALLEL_MODES,
        ),
    )
    device: str = field(default="cpu", metadata=_opt("cpu or cuda (under torchrun: one GPU a process)"))
    name: str = field(default="train", metadata=_opt("name of this run's checkpoint and log"))
    # a checkpoint of a width-4,096 SAE takes about 0.25 s to write here; every 50 steps that was 4%
    # of a CPU run (the state a spike goes back to is still kept every 50 steps, in memory)
    checkpoint_every: int = field(default=250, metadata=_opt("steps between checkpoints"))
    log_every: int = field(default=10, metadata=_opt("steps between log rows"))


@dataclass(frozen=True)
class Plan:
    """A training run with every value worked out (`resolve`): the settings with none left open, the
    checked specs each with its learning rate, and the run's length."""

    config: TrainConfig
    specs: list[TrainSpec]
    tokens: int  # training tokens per SAE
    steps: int
    epochs: int  # passes over the store the steps take
    store_tokens: int  # usable tokens in the store (the smallest over the run's sites)
    final_steps: int  # the last steps whose figures a saved SAE reports without held-out activations


def resolve(store: ActivationStore, specs: list[TrainSpec], tokens: int, cfg: TrainConfig) -> Plan:
    """The one place a run's open values become numbers: every spec checked (sites in canonical
    form), the settings checked, and each None of `cfg` and of a spec's `lr` replaced by the recipe's
    value for the optimiser and the run length: lr (`lr_signum`; a signum transcoder's
    `lr_signum_transcoder`; Adam's `lr`, or `lr_long` past `long_run_steps` steps), the dense
    penalty's limit (lower from `dense_long_tokens` training tokens on), the dead and dense
    penalties' coefficients (on with signum, off with Adam), the warm-ups and lr decay (fractions of
    the steps, at most the published step counts; none for signum's lr) and the dead window."""
    specs = [checked_spec(spec, store) for spec in specs]
    if not specs:
        raise ConfigError("nothing to train: give at least one SAE spec")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"the same SAE is asked for twice: {sorted({n for n in names if names.count(n) > 1})}"
        )
    checked_config(cfg)
    if tokens < cfg.batch_size:
        raise ConfigError(f"tokens {tokens} must be at least one batch ({cfg.batch_size})")
    steps = tokens // cfg.batch_size
    sites = sorted({parse_site(name) for s in specs for name in s.sites})
    available = min(int(store.manifest(s)["n_tokens_non_special"]) for s in sites)
    per_epoch = available // cfg.batch_size
    if per_epoch < 1:
        raise StoreError(
            f"the activation store holds {available} usable tokens, less than one batch ({cfg.batch_size})"
        )
    # only the fast JumpReLU step reads step_dtype: other runs keep float32 (and their run keys)
    fast_step = cfg.fast and any(architecture(s.architecture).fast_step for s in specs)
    config = _resolved_config(cfg, steps, fast_step)
    transcoder_lr = (
        SHORT_RUN.lr_signum_transcoder if cfg.optimizer == "signum" and cfg.lr is None else config.lr
    )
    specs = [
        dataclasses.replace(s, lr=s.lr if s.lr is not None else transcoder_lr if s.out_site else config.lr)
        for s in specs
    ]
    return Plan(
        config=config,
        specs=specs,
        tokens=tokens,
        steps=steps,
        epochs=math.ceil(steps / per_epoch),
        store_tokens=available,
        final_steps=max(1, round(FINAL_FRACTION * steps)),
    )


def _resolved_config(cfg: TrainConfig, steps: int, fast_step: bool = True) -> TrainConfig:
    """`cfg` with every None worked out for its optimiser and `steps` (see `resolve`), and its
    `step_dtype` for the device (float32 where no spec takes the fast step, `fast_step` False)."""
    signum = cfg.optimizer == "signum"
    lr = cfg.lr
    if lr is None:
        lr = (
            SHORT_RUN.lr_signum
            if signum
            else SHORT_RUN.lr_long
            if steps > SHORT_RUN.long_run_steps
            else SHORT_RUN.lr
        )
    lr_warmup = cfg.lr_warmup_steps
    if lr_warmup is None:
        lr_warmup = (
            0 if signum else min(PUBLISHED.lr_warmup_steps, round(SHORT_RUN.lr_warmup_fraction * steps))
        )
    lr_decay = cfg.lr_decay_steps
    if lr_decay is None:
        lr_decay = 0 if signum else round(SHORT_RUN.lr_decay_fraction * steps)
    l0_warmup = cfg.l0_warmup_steps
    if l0_warmup is None:
        l0_warmup = min(PUBLISHED.l0_warmup_steps, round(SHORT_RUN.l0_warmup_fraction * steps))
    dead_window = cfg.dead_window_tokens
    if dead_window is None:
        dead_window = min(PUBLISHED.dead_window_tokens, max(cfg.batch_size, SHORT_RUN.dead_window_tokens))
    if lr_warmup < 0 or l0_warmup < 0 or lr_decay < 0 or dead_window < 1:
        raise ConfigError(
            f"warm-ups must be >= 0 steps and the dead window >= 1 token, got {lr_warmup}, {l0_warmup}, {dead_window}"
        )
    return dataclasses.replace(
        cfg,
        lr=lr,
        lr_warmup_steps=lr_warmup,
        lr_decay_steps=min(lr_decay, max(0, steps - lr_warmup)),
        l0_warmup_steps=l0_warmup,
        dead_window_tokens=dead_window,
        dead_preact_coeff=_on_with_signum(cfg.dead_preact_coeff, SHORT_RUN.dead_preact_coeff, signum),
        dense_coeff=_on_with_signum(cfg.dense_coeff, SHORT_RUN.dense_coeff, signum),
        dense_density=_dense_density(cfg.dense_density, steps * cfg.batch_size),
        step_dtype=str(reading_dtype(cfg.step_dtype, cfg.device)).removeprefix("torch.")
        if fast_step
        else "float32",
    )


def _dense_density(value: float | None, tokens: int) -> float:
    """The dense penalty's limit: as given, else the recipe's for a run of `tokens` training tokens
    (lower from `dense_long_tokens` on)."""
    if value is not None:
        return value
    return SHORT_RUN.dense_density_long if tokens >= SHORT_RUN.dense_long_tokens else SHORT_RUN.dense_density


def _on_with_signum(value: float | None, recipe: float, signum: bool) -> float:
    """A penalty's coefficient: as given, else the recipe's with the sign optimiser (where it was
    measured) and 0 with Adam."""
    if value is not None:
        return value
    return recipe if signum else 0.0


# ---------------------------------------------------------------------------------------------
# Checks


def checked_spec(spec: TrainSpec, store: ActivationStore) -> TrainSpec:
    """The spec with its sites in canonical form, or a ConfigError naming what makes no sense."""
    for name in spec.sites:
        if parse_site(name) not in store.sites:
            raise ConfigError(
                f"site {name!r} is not in the activation store of {str(store.run_dir)!r}: "
                f"it holds {', '.join(map(str, store.sites))}"
            )
    site = str(parse_site(spec.site))
    out_site = None if spec.out_site is None else str(parse_site(spec.out_site))
    if out_site is not None:
        d_in, d_out = (int(store.manifest(parse_site(s))["d_in"]) for s in (site, out_site))
        if d_in != d_out:
            raise ConfigError(
                f"transcoder {site} -> {out_site}: the sites are {d_in} and {d_out} wide; expected sites "
                "of one width, such as an MLP's input and output (mlp_in.L -> mlp_out.L)"
            )
    elif spec.skip:
        raise ConfigError(f"skip (an affine skip connection) is a transcoder's: {site} needs an out_site")
    arch = architecture(spec.architecture)  # ConfigError: unknown architecture
    if not isinstance(spec.width, int) or spec.width < 1:
        raise ConfigError(f"width {spec.width!r} of {spec.site} must be a positive whole number of latents")
    arch.check_spec(spec)
    if spec.lr is not None:
        arch.check_positive(spec, "lr", spec.lr)
    return TrainSpec(**{**asdict(spec), "site": site, "out_site": out_site})


def checked_config(cfg: TrainConfig) -> None:
    """A ConfigError naming the first setting of `cfg` that makes no sense."""

    def finite(name: str, value: float, low: float, high: float = math.inf) -> None:
        if not (math.isfinite(value) and low <= value <= high):
            raise ConfigError(f"{name} {value!r} must be a finite number in [{low:g}, {high:g}]")

    check_name(cfg.name, "training run name")  # its checkpoint and log stay inside the run folder
    for name in ("batch_size", "checkpoint_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name.replace('_', ' ')} {getattr(cfg, name)} must be at least 1")
    for name in ("refit_dtype", "step_dtype"):
        if getattr(cfg, name) not in MODEL_DTYPES:
            raise ConfigError(
                f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: expected one of {', '.join(MODEL_DTYPES)}"
            )
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(f"learning rate {cfg.lr!r} must be a finite number > 0")
    if not (math.isfinite(cfg.bandwidth) and cfg.bandwidth > 0):
        raise ConfigError(f"bandwidth {cfg.bandwidth!r} must be a finite number > 0")
    if cfg.max_norm is not None and not (math.isfinite(cfg.max_norm) and cfg.max_norm > 1):
        raise ConfigError(
            f"max_norm {cfg.max_norm!r} must be a finite number > 1 (the scaled RMS norm) or None"
        )
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer {cfg.optimizer!r} must be one of {OPTIMIZERS}")
    finite("threshold_lr_ratio", cfg.threshold_lr_ratio, 0.0)
    if cfg.b_dec_init not in B_DEC_INITS:
        raise ConfigError(f"b_dec_init {cfg.b_dec_init!r} must be one of {B_DEC_INITS}")
    if cfg.threshold_init is not None:
        finite("threshold_init", cfg.threshold_init, THRESHOLD_FLOOR)
    for beta in cfg.adam_betas:
        finite("an Adam beta", beta, 0.0, 0.9999)
    for name in ("dead_preact_coeff", "dense_coeff", "auxk_coeff", "target_l0_coeff"):
        if getattr(cfg, name) is not None:
            finite(name, getattr(cfg, name), 0.0)
    if cfg.dense_density is not None:
        finite("dense_density", cfg.dense_density, 1e-6, 1.0)
    if cfg.refit_tokens < 0:
        raise ConfigError(f"refit_tokens {cfg.refit_tokens!r} must be 0 (no refit) or a number of tokens")
    if cfg.spike_factor != 0:
        finite("spike_factor (0 turns the guard off)", cfg.spike_factor, 1.5)
