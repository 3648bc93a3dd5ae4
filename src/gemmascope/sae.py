"""Sparse autoencoder modules: the base `SAE` and `SAEConfig` every architecture shares, the registry
of architectures, and the one path from model activations to latents (`encode_inputs`, with the
special and massive-token mask). A transcoder (Gemma Scope 2) is the same module reading one site and
writing another (`cfg.out_site`: MLP input to MLP output), with an optional affine skip connection
`W_skip`.

An architecture (JumpReLU, TopK, BatchTopK, ReLU, ...) is ONE file under `architectures/` holding its
module class (the activation) and an `Architecture` object: its training terms and after-step update,
its optimiser groups, its spec checks, its saved form and its folder suffix. `register_architecture`
adds it; `architecture(name)` is the one lookup every other module goes through (the training loop,
the optimiser, the file formats, the suite and the CLI never test for an architecture by name). The
package `gemmascope` imports `gemmascope.architectures` first, so the built-in ones are always there.

Knows nothing of files (see formats/) or of training loops (see train/): `Architecture` says what an
architecture adds to a training step, given the step's batch and settings, not how steps are run.
Every SAE here takes raw activations at inference: no input normalisation and no b_dec subtraction.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from gemmascope.errors import ConfigError, SiteError
from gemmascope.models import LanguageModel
from gemmascope.sites import Site, parse_site, site_d_in


@dataclass
class SAEConfig:
    """What an SAE is and where it reads: architecture, sizes, and the model site it was trained on."""

    architecture: str
    d_in: int
    d_sae: int
    k: int | None = None  # active latents per token, for an architecture that takes k (topk)
    model_name: str = ""
    site: str = ""  # e.g. "resid_post.6" (sites.Site string form)
    hook_name: str = ""  # TransformerLens name, e.g. "blocks.6.hook_resid_post"
    context_size: int = 128
    dataset: str = ""
    extra: dict[str, Any] = field(
        default_factory=dict
    )  # training details worth keeping (lambda, L0 target...)
    # The raw input norm above which training left tokens out (Gemma 3's massive activations: the
    # trainer's max_norm on scaled inputs x the scale C), None if it trained on every token.
    max_norm: float | None = None
    # A transcoder's output site (e.g. "mlp_out.6" for site "mlp_in.6"): it predicts that site's
    # activation instead of reconstructing its input; "" for an SAE.
    out_site: str = ""
    affine_skip: bool = False  # a transcoder's skip connection: x̂ = f @ W_dec + x @ W_skip + b_dec

    @property
    def is_transcoder(self) -> bool:
        return bool(self.out_site)

    def __post_init__(self) -> None:
        arch = architecture(self.architecture)  # ConfigError naming the registered ones
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ConfigError(f"SAE sizes must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if arch.uses_k and (self.k is None or not 0 < self.k <= self.d_sae):
            raise ConfigError(f"{self.architecture} needs 0 < k <= d_sae={self.d_sae}, got k={self.k}")
        if self.affine_skip and not self.out_site:
            raise ConfigError("affine_skip is a transcoder's: it needs out_site (the site it writes)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SAE(nn.Module):
    """Base SAE: `pre_acts = x @ W_enc + b_enc`, latents `f = activation(pre_acts)`,
    reconstruction `x_hat = f @ W_dec + b_dec`. Subclasses define the activation.

    A transcoder (`cfg.out_site` set) predicts its output site's activation: `f @ W_dec + b_dec`,
    plus `x @ W_skip` with the affine skip connection. Its `b_in [d_in]` buffer is training's
    pre-encoder bias (the input mean, as `b_dec` is an SAE's); saving folds it into `b_enc`, so a
    saved transcoder's is 0 and takes raw activations like every SAE here. Input and output sites
    of Gemma models are both d_model wide, so `W_dec` is `[d_sae, d_in]` for both kinds."""

    W_skip: nn.Parameter | None
    b_in: Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in)) if cfg.affine_skip else None
        if cfg.is_transcoder:
            self.register_buffer("b_in", torch.zeros(cfg.d_in))

    @property
    def is_transcoder(self) -> bool:
        return self.cfg.is_transcoder

    def pre_encoder_bias(self) -> Tensor:
        """`[d_in]`: what training subtracts from the input before encoding (`b_dec` for an SAE,
        `b_in` for a transcoder); folded into `b_enc` when the SAE is saved."""
        return self.b_in if self.is_transcoder else self.b_dec

    def centered(self, x: Tensor) -> Tensor:
        """`[..., d_in]`: what training's encoder sees, `x` minus the pre-encoder bias."""
        return x - self.pre_encoder_bias()

    def skip(self, x: Tensor) -> Tensor | float:
        """`[..., d_in]`: the affine skip connection's part of a transcoder's output, or 0."""
        return 0.0 if self.W_skip is None else x @ self.W_skip

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_acts(self, x: Tensor) -> Tensor:
        """`[..., d_in] -> [..., d_sae]`: the encoder's affine map before the activation."""
        return x @ self.W_enc + self.b_enc

    def activation(self, pre_acts: Tensor) -> Tensor:
        """`[..., d_sae] -> [..., d_sae]`: latent activations from pre-activations."""
        raise NotImplementedError

    def firing(self, pre_acts: Tensor) -> Tensor:
        """`[..., d_sae] -> bool [..., d_sae]`: where the latents fire (activation > 0); an
        architecture may answer without the activations."""
        return self.activation(pre_acts) > 0

    def active(self, pre_acts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The nonzero activations of `pre_acts [b, d_sae]` as `(rows, cols, values)`, rows in order
        (a sparse matrix's entries); an architecture may answer without the dense activations."""
        acts = self.activation(pre_acts)
        rows, cols = acts.nonzero().unbind(1)
        return rows, cols, acts[rows, cols]

    def encode(self, x: Tensor) -> Tensor:
        """`[..., d_in] -> [..., d_sae]`: latent activations of raw input activations."""
        return self.activation(self.pre_acts(x))

    def decode(self, f: Tensor) -> Tensor:
        """`[..., d_sae] -> [..., d_in]`: reconstruction from latent activations."""
        return f @ self.W_dec + self.b_dec

    def writes(self) -> list[tuple[str, Tensor]]:
        """Where a latent's activation is written and by which decoder `[d_sae, d_model]`: its
        output site (an SAE's own site) by `W_dec`; steering and ablation edit there. A CLT layer
        (`clt.layer_sae`) writes each later layer's MLP output by its own part."""
        return [(self.cfg.out_site or self.cfg.site, self.W_dec)]

    def forward(self, x: Tensor) -> Tensor:
        """`[..., d_in] -> [..., d_in]`: the reconstruction of `x` (a transcoder: its prediction of
        the output site's activation, skip connection included)."""
        return self.decode(self.encode(x)) + self.skip(x)


# ---------------------------------------------------------------------------------------------
# What an architecture adds to training and saving


class SpecLike(Protocol):
    """What an architecture reads of one SAE to train (`train.recipe.TrainSpec`): its width and the
    sparsity knobs (`l0_coeff` λ, `target_l0`, `k`)."""

    @property
    def architecture(self) -> str: ...
    @property
    def width(self) -> int: ...
    @property
    def l0_coeff(self) -> float | None: ...
    @property
    def target_l0(self) -> float | None: ...
    @property
    def k(self) -> int | None: ...


class SettingsLike(Protocol):
    """What an architecture reads of a run's resolved settings (`train.recipe.TrainConfig`)."""

    @property
    def bandwidth(self) -> float: ...
    @property
    def fast(self) -> bool: ...
    @property
    def step_dtype(self) -> str: ...
    @property
    def target_l0_coeff(self) -> float: ...
    @property
    def dead_preact_coeff(self) -> float | None: ...
    @property
    def dense_coeff(self) -> float | None: ...
    @property
    def dense_density(self) -> float | None: ...
    @property
    def auxk_coeff(self) -> float: ...
    @property
    def threshold_init(self) -> float | None: ...


@dataclass
class TrainBatch:
    """One SAE's part of one training step, as its architecture's loss reads it."""

    x: Tensor  # [batch, d_in] inputs, already / C, massive tokens left out
    target: Tensor | None  # [batch, d_in] a transcoder's output-site activations; None: x itself
    dead: Tensor  # [d_sae] bool: silent for the run's dead window
    density: Tensor  # [d_sae] running firing rate (-1: not measured yet)
    prefixes: tuple[int, ...] | None = None  # Matryoshka's nested dictionary sizes
    # data-parallel ranks: a value's mean over the ranks with this rank's gradient (None: one process)
    share: Callable[[Tensor], Tensor] | None = None

    @property
    def y(self) -> Tensor:
        """`[batch, d_in]`: what the SAE must give (`x`, or a transcoder's target)."""
        return self.x if self.target is None else self.target


@dataclass
class Terms:
    """An architecture's loss terms on one batch. The loop's loss is `recon_scale * recon +
    warm-up * sparsity + extra`; `acts` is what the after-step update reads."""

    recon: Tensor  # mean over the batch of ‖y − ŷ‖² (Matryoshka: over the nested reconstructions)
    l0: Tensor  # mean active latents per token
    fired: Tensor  # [d_sae] float32: on how many tokens of the batch each latent was active
    sparsity: Tensor | float  # the penalty the warm-up scales (λ·L0, the target-L0 penalty, L1)
    extra: Tensor | float = 0.0  # the auxiliary terms (dead and dense latents, AuxK)
    acts: Tensor | None = None  # [batch, d_sae] training-time latents, when the loss has them


def nested_recon(f: Tensor, W_dec: Tensor, residual: Tensor, prefixes: tuple[int, ...] | None) -> Tensor:
    """The reconstruction term of latents `f [batch, d_sae]` for `residual [batch, d_in]` (what the
    latents must give: the target less b_dec and any skip): the mean over the batch of
    ‖residual − f W_dec‖²; with Matryoshka `prefixes` m₁ < … < m_J = d_sae (Gemma Scope 2, Bussmann et
    al. 2025), the mean over j of that term for the reconstruction from the first mⱼ latents alone,
    so the first latents must reconstruct on their own (broad features first, the rest refining)."""
    bounds = prefixes or (f.shape[1],)
    partial: Tensor | float = 0.0
    total: Tensor | float = 0.0
    low = 0
    for high in bounds:
        partial = partial + f[:, low:high] @ W_dec[low:high]
        total = total + (residual - partial).pow(2).sum(-1).mean()
        low = high
    assert isinstance(total, Tensor)
    return total / len(bounds)


# The knobs a spec can set its sparsity with, and the words its errors use for them.
KNOBS = ("l0_coeff", "target_l0", "k")


class Architecture:
    """How one SAE architecture encodes, trains and is saved. Subclass it beside the module class
    (one file under `architectures/`), set the class attributes, override the hooks whose default
    does not fit, and register one instance with `register_architecture`.

    The defaults are a plain activation SAE: the training latents are `module.activation` of the
    pre-activations (`train_activation`), the loss is the reconstruction plus `penalty` plus
    `aux_loss` (both 0), nothing happens after a step, no parameter beyond the four base ones."""

    name: str = ""  # cfg.architecture, e.g. "jumprelu"
    module: type[SAE] = SAE  # the nn.Module of its SAEs
    knobs: tuple[str, ...] = ()  # the spec fields that set its sparsity, some of KNOBS
    saelens_name: str = ""  # SAELens's name of it in cfg.json ("standard" is its ReLU SAE)
    saved_as: str = ""  # the architecture its SAEs are saved as ("": itself); see `as_saved`
    folder_tag: str = ""  # its folders' suffix, `l0_52_topk` ("": none)
    extra_tensors: tuple[str, ...] = ()  # per-latent [d_sae] tensors saved beside W_enc, W_dec, b_enc, b_dec
    input_scaled: tuple[str, ...] = ()  # tensors in the pre-activations' units, times C when folding
    fixed_biases: bool = True  # the sign optimiser keeps b_enc at 0 and b_dec at the data mean
    tracks_density: bool = False  # its loss reads every latent's running firing rate (`TrainBatch.density`)
    data_parallel: bool = True  # a step may be split over data-parallel ranks
    fast_step: bool = False  # `TrainConfig.fast` (a sparse step) changes how it trains

    @property
    def uses_k(self) -> bool:
        """Whether its modules read `SAEConfig.k` (active latents per token)."""
        return "k" in self.knobs

    # -- specs ------------------------------------------------------------------------------

    def check_spec(self, spec: SpecLike) -> None:
        """A ConfigError naming what makes no sense in the spec's sparsity knobs."""
        raise NotImplementedError

    def sparsity(self, *, target_l0: float | None = None, l0_coeff: float | None = None) -> dict[str, Any]:
        """The spec fields of one sparsity a suite asks for, a target L0 or a λ: the target L0 as
        such, or as `k` for an architecture that takes k; a ConfigError if it takes neither."""
        if target_l0 is not None:
            if "target_l0" in self.knobs:
                return {"target_l0": target_l0}
            if "k" in self.knobs:
                return {"k": max(1, round(target_l0))}
            raise ConfigError(f"a {self.name} SAE takes no target L0: give it λs (l0_coeffs) instead")
        if "l0_coeff" not in self.knobs:
            raise ConfigError(f"a {self.name} SAE takes no λ (l0_coeffs): give it target L0s instead")
        return {"l0_coeff": l0_coeff}

    @staticmethod
    def check_positive(spec: SpecLike, knob: str, value: float | None, allow_zero: bool = False) -> None:
        """A ConfigError unless `value` is a finite number > 0 (>= 0 with `allow_zero`)."""
        ok = value is not None and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
        if not ok:
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(
                f"{knob} {value!r} of a {spec.architecture} SAE must be a finite number {bound}"
            )

    # -- training -----------------------------------------------------------------------------

    def init(self, sae: SAE, threshold_init: float) -> None:
        """Its own parameters at the recipe's initialisation (after W_enc, W_dec, b_enc, b_dec)."""

    def init_from_data(self, sae: SAE, x: Tensor, init_l0: float, settings: SettingsLike) -> None:
        """Its own parameters from a first batch `x [batch, d_in]` (already / C, the recipe's data
        init done): `init_l0` is the L0 to start at."""

    def param_groups(self, sae: SAE, lr: float, threshold_lr: float) -> list[dict[str, Any]]:
        """The sign optimiser's groups for its own parameters (beside W_enc, W_dec and the biases)."""
        return []

    def train_activation(self, sae: SAE, pre_acts: Tensor) -> Tensor:
        """`[batch, d_sae]`: the training-time latents of a batch's pre-activations."""
        return sae.activation(pre_acts)

    def terms(self, sae: SAE, batch: TrainBatch, spec: SpecLike, settings: SettingsLike) -> Terms:
        """The loss terms of one batch: the reconstruction of `batch.y` (nested with Matryoshka
        prefixes), the L0 and the latents that fired, `penalty` and `aux_loss`."""
        x = batch.x
        f = self.train_activation(sae, sae.pre_acts(sae.centered(x)))  # [batch, d_sae]
        x_hat = sae.decode(f) + sae.skip(x)
        recon = nested_recon(f, sae.W_dec, batch.y - sae.b_dec - sae.skip(x), batch.prefixes)
        active = f > 0
        l0 = active.sum(-1).float().mean()
        sparsity = self.penalty(f, spec)
        extra = self.aux_loss(sae, batch, x_hat, settings)
        return Terms(recon, l0, active.sum(0, dtype=torch.float32), sparsity, extra, acts=f)

    def penalty(self, f: Tensor, spec: SpecLike) -> Tensor | float:
        """The sparsity penalty of training latents `f [batch, d_sae]` (0: none; `k` sets sparsity)."""
        return 0.0

    def aux_loss(self, sae: SAE, batch: TrainBatch, x_hat: Tensor, settings: SettingsLike) -> Tensor | float:
        """Auxiliary loss terms (0: none), given the reconstruction `x_hat [batch, d_in]`."""
        return 0.0

    def after_step(self, sae: SAE, terms: Terms) -> None:
        """What follows each optimiser step (constraints, running estimates), given the step's terms."""

    # -- saving -------------------------------------------------------------------------------

    def as_saved(self, sae: SAE) -> SAE:
        """The module as it is saved and used at inference (BatchTopK: a JumpReLU SAE)."""
        return sae


_REGISTRY: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Add an architecture to the registry under `arch.name` (a ValueError if the name is taken by
    another); from then on SAEConfig, build_sae, training, the formats and the CLI know it."""
    if not arch.name or not arch.name.isidentifier():
        raise ValueError(f"an architecture needs a plain name, got {arch.name!r}")
    held = _REGISTRY.get(arch.name)
    if held is not None and type(held) is not type(arch):
        raise ValueError(f"architecture {arch.name!r} is already registered ({type(held).__name__})")
    _REGISTRY[arch.name] = arch
    return arch


def architecture(name: str) -> Architecture:
    """The registered architecture called `name`, or a ConfigError naming the registered ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown architecture {name!r}: expected one of {architecture_names()}") from None


def architecture_names() -> tuple[str, ...]:
    """The names of the registered architectures, in the order they were registered."""
    return tuple(_REGISTRY)


def build_sae(cfg: SAEConfig) -> SAE:
    """An SAE module of the configured architecture with zero parameters (load or init them next)."""
    return architecture(cfg.architecture).module(cfg)


def __getattr__(name: str) -> Any:
    """Old imports: `ARCHITECTURES` (now `architecture_names()`) and the module classes that moved to
    `gemmascope.architectures` (`from gemmascope.sae import JumpReLUSAE`); new code imports them from
    there."""
    if name == "ARCHITECTURES":
        return architecture_names()
    for arch in _REGISTRY.values():
        if arch.module.__name__ == name:
            return arch.module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# From model activations to latents: the one path


def norm_limit(sae: SAE) -> float | None:
    """The raw input norm above which the SAE's training left tokens out (`cfg.max_norm`, set by
    training: Gemma 3's massive activations, see train.recipe.MAX_SCALED_NORM), or None. Evaluation,
    splicing and the feature index leave such positions out as they do BOS. A config without the
    field but with the extra keys older training wrote gives the same limit (`max_norm_from_extra`)."""
    if sae.cfg.max_norm is not None:
        return sae.cfg.max_norm
    return max_norm_from_extra(sae.cfg.extra)


def max_norm_from_extra(extra: dict[str, Any]) -> float | None:
    """`SAEConfig.max_norm` from the `cfg.extra` keys training wrote before that field existed:
    `max_scaled_norm` x `scale`, or None if either is missing."""
    if extra.get("max_scaled_norm") is None or extra.get("scale") is None:
        return None
    return float(extra["max_scaled_norm"]) * float(extra["scale"])


def sae_site(model: LanguageModel, sae: SAE, name: str | None = None) -> Site:
    """The model site an SAE reads, checked against the model: the SAE names a site, the model has
    that layer, and the activation there is the SAE's `d_in` wide (else a `SiteError`, naming the
    SAE by `name` when given). Warns when the SAE's cfg names another model."""
    label = f"SAE {name!r}" if name else f"SAE ({sae.cfg.architecture}, d_sae={sae.d_sae})"
    spec = sae.cfg.site or sae.cfg.hook_name
    if not spec:
        raise SiteError(
            f"{label} has no site in its config, so it names no site to read: expected one such as "
            "'resid_post.6' (cfg.json 'metadata.hook_name'; on the command line: --site)"
        )
    try:
        site = parse_site(spec, model.n_layers)
    except ConfigError as err:
        raise SiteError(f"model {model.name!r} has no site {spec!r} for {label}: {err}") from err
    width = site_d_in(model, site)
    if sae.d_in != width:
        raise SiteError(
            f"{label} has d_in={sae.d_in} and reads {sae.d_in}-wide activations but site {site} of model "
            f"{model.name!r} is {width} wide: expected the model and site the SAE was trained on (its cfg "
            f"says model {sae.cfg.model_name or '?'!r})"
        )
    made_for = sae.cfg.model_name
    if made_for and _short_model_name(made_for) != _short_model_name(model.name):
        warnings.warn(
            f"SAE at {site} was made for model {made_for!r} but is used on {model.name!r}", stacklevel=2
        )
    return site


def _short_model_name(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def massive_mask(sae: SAE, x: Tensor) -> Tensor:
    """`[...]` bool, True where the input `x [..., d_in]` is above the SAE's `norm_limit` (inputs
    like those its training left out: Gemma 3's massive activations); all False without a limit.
    The norm is taken of `x` as the model gives it, before any dtype change."""
    limit = norm_limit(sae)
    if limit is None:
        return torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
    return x.norm(dim=-1) > limit


@torch.no_grad()
def encode_inputs(sae: SAE, x: Tensor, keep: Tensor | None = None) -> Tensor:
    """`[..., d_in] -> [..., d_sae]`: the latents of model activations `x` (any dtype, any device),
    computed in the SAE's dtype on its device, and zero where the position is left out: where
    `keep [...]` is False (BOS, EOS, pad: `~corpus.special_mask(ids, model.special_token_ids)`)
    and where `x` is massive (`massive_mask`). The latents are on the SAE's device, in its dtype."""
    out = ~massive_mask(sae, x)
    if keep is not None:
        out = keep.to(out.device) & out
    f = sae.encode(x.to(sae.W_enc.device, sae.W_enc.dtype))
    return f * out.to(f.device)[..., None]
