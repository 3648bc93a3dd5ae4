"""Sparse autoencoder modules. Owns the JumpReLU SAE of Gemma Scope (RECIPE.md section 1) and the
baselines it is compared with (TopK, BatchTopK, ReLU with an L1 penalty): parameters, encode,
decode, forward, and the straight-through functions whose pseudo-derivatives train the JumpReLU
threshold. A transcoder (Gemma Scope 2) is the same module reading one site and writing another
(`cfg.out_site`: MLP input to MLP output), with an optional affine skip connection `W_skip`.

Knows nothing of files (see formats.py) or of training loops (see train/). Every SAE here takes
raw activations at inference: no input normalisation and no b_dec subtraction.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gemmascope.errors import ConfigError, SiteError
from gemmascope.models import LanguageModel
from gemmascope.sites import Site, parse_site, site_d_in

ARCHITECTURES = ("jumprelu", "topk", "batchtopk", "relu")


@dataclass
class SAEConfig:
    """What an SAE is and where it reads: architecture, sizes, and the model site it was trained on."""

    architecture: str
    d_in: int
    d_sae: int
    k: int | None = None  # active latents per token for topk / batchtopk
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
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"unknown SAE architecture {self.architecture!r}: expected one of {ARCHITECTURES}"
            )
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ConfigError(f"SAE sizes must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.architecture in ("topk", "batchtopk") and (self.k is None or not 0 < self.k <= self.d_sae):
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

    def encode(self, x: Tensor) -> Tensor:
        """`[..., d_in] -> [..., d_sae]`: latent activations of raw input activations."""
        return self.activation(self.pre_acts(x))

    def decode(self, f: Tensor) -> Tensor:
        """`[..., d_sae] -> [..., d_in]`: reconstruction from latent activations."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """`[..., d_in] -> [..., d_in]`: the reconstruction of `x` (a transcoder: its prediction of
        the output site's activation, skip connection included)."""
        return self.decode(self.encode(x)) + self.skip(x)


class JumpReLUSAE(SAE):
    """Gemma Scope's JumpReLU SAE: `f = pre_acts * H(pre_acts - threshold)`, one learned threshold
    per latent (RECIPE 1). Written exactly as the Gemma Scope tutorial's reference `JumpReLUSAE`
    (mask = pre > threshold; acts = mask * relu(pre)) so loaded Gemma Scope files encode
    bit-for-bit as the reference does; equal to `pre * H(pre - threshold)` whenever threshold >= 0."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae))

    def activation(self, pre_acts: Tensor) -> Tensor:
        mask = pre_acts > self.threshold
        return mask * torch.nn.functional.relu(pre_acts)


class TopKSAE(SAE):
    """TopK SAE (Gao et al. 2024): keep the `k` largest pre-activations of each token, ReLU'd."""

    def activation(self, pre_acts: Tensor) -> Tensor:
        k = int(self.cfg.k or 0)
        values, indices = pre_acts.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre_acts).scatter(-1, indices, torch.nn.functional.relu(values))


class BatchTopKSAE(SAE):
    """BatchTopK SAE (Bussmann et al. 2024). In training, `batch_activation` keeps the `k * batch`
    largest ReLU'd pre-activations of the whole batch; at inference it is a JumpReLU SAE with one
    global `threshold` (a 0-dim buffer the trainer estimates), and it is saved as one
    (`to_jumprelu`)."""

    threshold: Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))

    def batch_activation(self, pre_acts: Tensor) -> Tensor:
        """`[batch, d_sae] -> [batch, d_sae]`: the training-time activation, `k` per token on average."""
        relu = torch.nn.functional.relu(pre_acts)
        flat = relu.flatten()
        n_keep = min(int(self.cfg.k or 0) * pre_acts.shape[0], flat.numel())
        values, indices = flat.topk(n_keep, sorted=False)
        return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre_acts)

    def activation(self, pre_acts: Tensor) -> Tensor:
        mask = pre_acts > self.threshold
        return mask * torch.nn.functional.relu(pre_acts)

    def to_jumprelu(self) -> JumpReLUSAE:
        """The inference-time JumpReLU SAE: same weights, `threshold` filled with the global value."""
        extra = {**self.cfg.extra, "trained_as": "batchtopk", "k": self.cfg.k}
        cfg = SAEConfig(**{**self.cfg.to_dict(), "architecture": "jumprelu", "k": None, "extra": extra})
        sae = JumpReLUSAE(cfg)
        with torch.no_grad():
            for name, value in self.state_dict().items():
                if name != "threshold":  # a 0-dim global value here, one per latent there
                    getattr(sae, name).copy_(value)
            sae.threshold.fill_(float(self.threshold))
        return sae


class ReLUSAE(SAE):
    """ReLU SAE (Bricken et al. 2023), trained with an L1 penalty on `f` (see train/loop.py)."""

    def activation(self, pre_acts: Tensor) -> Tensor:
        return torch.nn.functional.relu(pre_acts)


def build_sae(cfg: SAEConfig) -> SAE:
    """An SAE module of the configured architecture with zero parameters (load or init them next)."""
    classes: dict[str, type[SAE]] = {
        "jumprelu": JumpReLUSAE,
        "topk": TopKSAE,
        "batchtopk": BatchTopKSAE,
        "relu": ReLUSAE,
    }
    return classes[cfg.architecture](cfg)


# ---------------------------------------------------------------------------------------------
# Straight-through functions for training the JumpReLU threshold (JumpReLU paper, arXiv 2407.14435,
# section 4; RECIPE 2). The forward passes are exact; the backward passes use the rectangle kernel
# K(u) = 1 if |u| < 1/2 else 0 with bandwidth eps for the derivatives with respect to theta.


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth = bandwidth
        return pre_acts * (pre_acts > threshold)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        pre_acts, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = (pre_acts > threshold) * grad_out  # ordinary gradient where active
        # d f / d theta = -(theta / eps) K((pre - theta) / eps)
        grad_theta = -(threshold / eps) * _rectangle((pre_acts - threshold) / eps) * grad_out
        return grad_pre, grad_theta.sum_to_size(threshold.shape), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth = bandwidth
        return (pre_acts > threshold).to(pre_acts.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        pre_acts, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        # d H / d theta = -(1 / eps) K((pre - theta) / eps); no gradient to pre (RECIPE 2)
        grad_theta = -(1.0 / eps) * _rectangle((pre_acts - threshold) / eps) * grad_out
        return torch.zeros_like(pre_acts), grad_theta.sum_to_size(threshold.shape), None


def jumprelu(pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """`[..., d_sae]`: `pre_acts * H(pre_acts - threshold)` whose gradient with respect to the
    threshold `[d_sae]` is the rectangle-kernel pseudo-derivative with bandwidth `bandwidth`."""
    out: Tensor = _JumpReLU.apply(pre_acts, threshold, bandwidth)
    return out


def step(pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """`[..., d_sae]`: the Heaviside step `H(pre_acts - threshold)` as floats, whose gradient goes to
    the threshold only (rectangle-kernel pseudo-derivative); summed over latents it is the L0."""
    out: Tensor = _Step.apply(pre_acts, threshold, bandwidth)
    return out


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


# ---------------------------------------------------------------------------------------------
# From model activations to latents: the one path


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
