"""The JumpReLU SAE of Gemma Scope (RECIPE.md sections 1 and 2), the default architecture: one learned
threshold per latent, `f = pre_acts * H(pre_acts - threshold)`. Holds the module (`JumpReLUSAE`), the
straight-through functions whose pseudo-derivatives train the thresholds (`jumprelu`, `step`), its
loss terms (the reconstruction and L0 terms, `jumprelu_terms` as the plain reference beside the sparse
step of `sparse_step`; λ·L0 or Gemma Scope 2's target-L0 penalty; the pre-activation loss on dead
latents and the penalty on dense ones), the threshold's initialisation, optimiser group and floor, and
the architecture object that registers all of it (`JumpReLU`).

Knows nothing of the training loop or of files: the loop calls `JumpReLU` through `sae.architecture`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gemmascope import sparse_step
from gemmascope.errors import ConfigError
from gemmascope.models import reading_dtype
from gemmascope.sae import (
    SAE,
    Architecture,
    SAEConfig,
    SettingsLike,
    SpecLike,
    Terms,
    TrainBatch,
    nested_recon,
    register_architecture,
)

# RECIPE 2: theta is the raw threshold "clamped > 0"; this floor keeps it strictly positive.
THRESHOLD_FLOOR = 1e-6


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

    def firing(self, pre_acts: Tensor) -> Tensor:
        # mask * relu(pre) > 0 exactly: pre over θ and over 0, one comparison
        return pre_acts > self.threshold.clamp_min(0)

    def active(self, pre_acts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # where it fires, mask * relu(pre) is pre itself: no dense activations made
        rows, cols = self.firing(pre_acts).nonzero().unbind(1)
        return rows, cols, pre_acts[rows, cols]


# ---------------------------------------------------------------------------------------------
# Straight-through functions for training the threshold (JumpReLU paper, arXiv 2407.14435, section
# 4; RECIPE 2). The forward passes are exact; the backward passes use the rectangle kernel
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


# ---------------------------------------------------------------------------------------------
# Loss terms


def jumprelu_terms(
    sae: JumpReLUSAE,
    x: Tensor,
    bandwidth: float,
    target: Tensor | None = None,
    prefixes: tuple[int, ...] | None = None,
    dead: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The terms of the JumpReLU loss on a batch `x [batch, d_in]` already divided by C.

    The encoder sees `sae.centered(x)` (the pre-encoder bias). Returns `recon` (mean over the batch
    of ‖target − x̂‖², summed over d_in; the target is `x` itself for an SAE, the output site's
    `target [batch, d_in]` for a transcoder, whose x̂ includes its skip connection; with Matryoshka
    `prefixes`, `nested_recon`'s mean over the nested reconstructions), `rate [d_sae]` (each latent's
    firing rate on the batch, the mean of H(preᵢ − θᵢ), whose gradient goes to θ only, through the
    rectangle-kernel pseudo-derivative; L0 is its sum, the dense penalty reads it too), `fired
    [d_sae]` (float32: on how many tokens of the batch each latent was active) and `below` (Anthropic's
    pre-activation loss on the `dead [n]` latents, indices: the batch mean of Σᵢ ReLU(θᵢ − preᵢ)
    over them, decoder rows at unit norm; its gradient raises their pre-activations and lowers their
    thresholds until they fire again; 0 without dead latents).
    This is the plain reference; `sparse_step.jumprelu_terms_sparse` is the fast path with
    the same values and gradients."""
    pre_acts = sae.pre_acts(sae.centered(x))  # [batch, d_sae]
    f = jumprelu(pre_acts, sae.threshold, bandwidth)
    y = x if target is None else target
    recon = nested_recon(f, sae.W_dec, y - sae.b_dec - sae.skip(x), prefixes)
    active = step(pre_acts, sae.threshold, bandwidth)  # [batch, d_sae] floats 0/1
    fired = (active > 0).sum(0, dtype=torch.float32)
    below = pre_acts.new_zeros(())
    if dead is not None and dead.numel():
        below = torch.relu(sae.threshold[dead] - pre_acts[:, dead]).sum(-1).mean()
    return recon, active.mean(0), fired, below


def dense_penalty(rate: Tensor, dense: Tensor, limit: float) -> Tensor:
    """Gemma Scope 2's penalty on latents that fire too often: Σᵢ ReLU(rateᵢ − `limit`) over the
    `dense [d_sae]` (bool) latents, `rate [d_sae]` the batch's firing rates as the loss terms give
    them (the whole batch's, data-parallel), differentiable in θ through the straight-through step
    (as the L0 term, which is their sum). The rates come from the step's own pre-activations, so the
    penalty costs no product of its own (it took one over the latents over the limit: hundreds of
    them at the 3% limit, a tenth of a CPU step)."""
    return torch.relu(rate[dense] - limit).sum()


# ---------------------------------------------------------------------------------------------
# The architecture


class JumpReLU(Architecture):
    """JumpReLU's training and saving. Sparsity: a fixed λ (`l0_coeff`, λ·L0) or Gemma Scope 2's
    `target_l0` (target_l0_coeff·(L0/L0* − 1)²), both through the straight-through L0 term; dead
    latents get the pre-activation loss and latents over the density limit the dense penalty (the
    run's `dead_preact_coeff`, `dense_coeff`, `dense_density`); thresholds train at the threshold lr
    and stay over THRESHOLD_FLOOR. `fast` takes the sparse step for SAEs (a transcoder, which has a
    target, the reference)."""

    name = "jumprelu"
    module = JumpReLUSAE
    knobs = ("l0_coeff", "target_l0")
    saelens_name = "jumprelu"
    folder_tag = ""  # the default architecture: l0_52
    extra_tensors = ("threshold",)
    input_scaled = ("threshold",)
    tracks_density = True
    fast_step = True

    def check_spec(self, spec: SpecLike) -> None:
        if (spec.l0_coeff is None) == (spec.target_l0 is None):
            raise ConfigError(
                "a jumprelu SAE needs exactly one of l0_coeff (λ) or target_l0, "
                f"got l0_coeff={spec.l0_coeff!r}, target_l0={spec.target_l0!r}"
            )
        if spec.l0_coeff is not None:
            self.check_positive(spec, "l0_coeff", spec.l0_coeff, allow_zero=True)
        else:
            self.check_positive(spec, "target_l0", spec.target_l0)
            if float(spec.target_l0 or 0) >= spec.width:
                raise ConfigError(f"target_l0 {spec.target_l0} must be below the width {spec.width}")

    def init(self, sae: SAE, threshold_init: float) -> None:
        with torch.no_grad():
            _threshold(sae).fill_(threshold_init)

    def init_from_data(self, sae: SAE, x: Tensor, init_l0: float, settings: SettingsLike) -> None:
        """Thresholds at the pre-activation each latent exceeds on `init_l0 / width` of the batch
        (Anthropic's 2025 "b_enc at a target firing rate", set through θ), so L0 starts at its target
        instead of at most of the width; a run's own `threshold_init` keeps the recipe's θ."""
        if settings.threshold_init is not None:
            return
        with torch.no_grad():
            pre_acts = sae.pre_acts(sae.centered(x))  # [batch, d_sae]
            k = min(x.shape[0] - 1, max(1, round(init_l0 / sae.d_sae * x.shape[0])))
            top = pre_acts.topk(k + 1, dim=0).values  # [k + 1, d_sae]
            # halfway between the k-th and (k+1)-th largest: no token sits on the threshold's edge
            _threshold(sae).copy_((0.5 * (top[k - 1] + top[k])).clamp_min(THRESHOLD_FLOOR))

    def param_groups(self, sae: SAE, lr: float, threshold_lr: float) -> list[dict[str, Any]]:
        return [
            {
                "params": [_threshold(sae)],
                "lr": threshold_lr,
                "lr_scale": threshold_lr / lr,
                "floor": THRESHOLD_FLOOR,
            }
        ]

    def terms(self, sae: SAE, batch: TrainBatch, spec: SpecLike, settings: SettingsLike) -> Terms:
        assert isinstance(sae, JumpReLUSAE)
        x = batch.x
        dead = batch.dead.nonzero().squeeze(1) if settings.dead_preact_coeff else None  # [n_dead]
        if settings.fast:
            recon, rate, fired, below = sparse_step.jumprelu_terms_sparse(
                sae,
                x,
                settings.bandwidth,
                batch.prefixes,
                batch.target,
                reading_dtype(settings.step_dtype, x.device),
                dead,
            )
        else:
            recon, rate, fired, below = jumprelu_terms(
                sae, x, settings.bandwidth, batch.target, batch.prefixes, dead
            )
        if batch.share is not None:
            rate = batch.share(rate)  # the whole batch's: the penalties are not linear in it
        l0 = rate.sum()
        sparsity: Tensor | float
        if spec.target_l0 is not None:  # Gemma Scope 2: quadratic penalty around L0*
            sparsity = settings.target_l0_coeff * (l0 / spec.target_l0 - 1).pow(2)
        else:
            sparsity = float(spec.l0_coeff or 0.0) * l0
        extra: Tensor | float = (settings.dead_preact_coeff or 0.0) * below
        limit = settings.dense_density  # None, as the coefficient, where the settings are not resolved
        if settings.dense_coeff and limit is not None:
            dense = batch.density > limit
            if dense.any():
                extra = extra + settings.dense_coeff * dense_penalty(rate, dense, limit)
        return Terms(recon, l0, fired, sparsity, extra)

    def after_step(self, sae: SAE, terms: Terms) -> None:
        with torch.no_grad():
            _threshold(sae).clamp_(min=THRESHOLD_FLOOR)


def _threshold(sae: SAE) -> Tensor:
    """The SAE's per-latent `threshold [d_sae]`."""
    threshold = sae.threshold
    assert isinstance(threshold, Tensor)
    return threshold


JUMPRELU = register_architecture(JumpReLU())
