"""How an SAE starts (RECIPE.md section 2, "init"): the recipe's initialisation (`init_sae`) and the
start from the run's first batch (`init_from_data`: b_dec at the data mean, a transcoder's input mean
and its skip connection by ridge regression, `fit_skip`; then what the architecture starts from data,
JumpReLU's thresholds at the target firing rate).

Knows nothing of the training loop, checkpoints or files.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gemmascope.sae import SAE, architecture
from gemmascope.train.config import TrainConfig
from gemmascope.train.recipe import SHORT_RUN, THRESHOLD_INIT

# A transcoder's affine skip connection starts as the ridge regression of the output site on the
# input site over the first batches (SKIP_FIT_BATCHES of them), SKIP_RIDGE x the mean eigenvalue of the
# input covariance as the ridge. Measured on Gemma 3 270M (held-out FVU of the skip alone; 4,096
# tokens): layer 6 0.28, layer 12 0.54, where the skip learned by sign descent from 0 over 200k tokens
# left whole transcoders at 0.60 and 0.64. With the optimiser it then stays fixed (`optim`): the
# latents learn what the linear map misses.
SKIP_FIT_BATCHES = 4
SKIP_RIDGE = 0.1


def init_sae(sae: SAE, generator: torch.Generator, threshold_init: float = THRESHOLD_INIT) -> SAE:
    """RECIPE 2 init: W_dec He-uniform, then each row scaled to unit norm; W_enc = W_decᵀ (untied
    afterwards); b_enc = b_dec = 0; then the architecture's own parameters (JumpReLU: θ =
    `threshold_init`, 0.001)."""
    with torch.no_grad():
        w_dec = torch.empty(sae.d_sae, sae.d_in)
        torch.nn.init.kaiming_uniform_(w_dec, generator=generator)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    architecture(sae.cfg.architecture).init(sae, threshold_init)
    return sae


def fit_skip(x: Tensor, target: Tensor, ridge: float = SKIP_RIDGE) -> tuple[Tensor, Tensor]:
    """`(W [d_in, d_out], b [d_out])` of the ridge regression `target ≈ x @ W + b` on `x [n, d_in]`,
    `target [n, d_out]`, the ridge `ridge` x the mean eigenvalue of the centred input covariance."""
    mx, my = x.mean(0), target.mean(0)
    xc = (x - mx).double()
    gram = xc.T @ xc
    reg = ridge * gram.trace() / gram.shape[0]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    w = torch.linalg.solve(gram + reg * eye, xc.T @ (target - my).double()).to(x.dtype)
    return w, my - mx @ w


def init_from_data(
    sae: SAE, x: Tensor, cfg: TrainConfig, init_l0: float, target: Tensor | None = None
) -> SAE:
    """Start what the data sets the scale of from a first batch `x [batch, d_in]` (already / C; a
    transcoder's output-site batch is `target`: `b_dec` starts at its mean, `b_in` at `x`'s, and an
    affine skip connection at the ridge regression of `target` on `x`, `fit_skip`).

    With the sign optimiser, W_enc's columns are scaled to `SHORT_RUN.signum_enc_init_norm`. `b_dec`
    at the data mean with `b_dec_init="mean"` (`SHORT_RUN.b_dec_init` says why). Then the
    architecture's own start (`Architecture.init_from_data`; JumpReLU: each threshold at the
    pre-activation its latent exceeds on `init_l0 / width` of the batch)."""
    with torch.no_grad():
        if cfg.optimizer == "signum":
            sae.W_enc.mul_(SHORT_RUN.signum_enc_init_norm)
        if sae.is_transcoder:
            sae.b_in.copy_(x.mean(0))
        if cfg.b_dec_init == "mean":
            sae.b_dec.copy_((x if target is None else target).mean(0))
        if (
            sae.W_skip is not None and target is not None
        ):  # the skip as the linear regression, b_dec its offset
            w, b = fit_skip(x, target)
            sae.W_skip.copy_(w)
            sae.b_dec.copy_(b)
    architecture(sae.cfg.architecture).init_from_data(sae, x, init_l0, cfg)
    return sae
