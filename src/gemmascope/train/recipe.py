"""The Gemma Scope training recipe (RECIPE.md section 2), as numbers and pure functions: the published
constants beside the short-run defaults measured here (`PUBLISHED`, `SHORT_RUN`), what to train
(`TrainSpec`) and how (`TrainConfig`), the JumpReLU loss terms with their straight-through
pseudo-derivatives, the initialisation, the lr and sparsity warm-ups, the decoder-gradient projection,
folding the input scaling into the weights, and the run plan (steps, epochs, warm-ups and dead window
scaled to the run length) with the checks of every spec and setting.

Knows nothing of the training loop, optimiser state, checkpoints, logs, files or processes (see
`loop`, `checkpoint`, `distributed`); of the activation store it reads only the manifests.

Where the constants come from (Gemma Scope, arXiv 2408.05147, section 3, condensed in RECIPE.md 2):
the published value is kept beside every short-run default chosen here, and both are written into
every saved SAE's `cfg.extra`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from gemmascope.activations import ActivationStore
from gemmascope.errors import ConfigError, StoreError
from gemmascope.runs import check_name
from gemmascope.sae import ARCHITECTURES, SAE, BatchTopKSAE, JumpReLUSAE, SAEConfig, build_sae, jumprelu, step
from gemmascope.sites import parse_site

# ---------------------------------------------------------------------------------------------
# Constants of the recipe

# Gemma Scope section 3 (RECIPE 2), exactly as published. Tuned for 4-16B tokens per SAE.
PUBLISHED: dict[str, Any] = {
    "lr": 7e-5,  # Adam learning rate
    "lr_warmup_steps": 1_000,  # cosine warm-up of lr from 0.1 lr to lr
    "l0_warmup_steps": 10_000,  # linear warm-up of the sparsity coefficient from 0 to lambda
    "batch_size": 4_096,  # activations per step
    "adam_betas": (0.0, 0.999),
    "adam_eps": 1e-8,
    "bandwidth": 0.001,  # epsilon of the rectangle kernel; valid because E‖x‖² = 1
    "threshold_init": 0.001,  # theta at init, raw fp32 parameter
    "dead_window_tokens": 10_000_000,  # a latent silent for this many tokens is dead
}
BANDWIDTH = PUBLISHED["bandwidth"]
THRESHOLD_INIT = PUBLISHED["threshold_init"]
ADAM_BETAS = PUBLISHED["adam_betas"]
ADAM_EPS = PUBLISHED["adam_eps"]
LR_WARMUP_START = 0.1  # the lr warm-up starts at 0.1 * lr (Gemma Scope section 3)
# RECIPE 2: theta is the raw threshold "clamped > 0"; this floor keeps it strictly positive.
THRESHOLD_FLOOR = 1e-6

# Short-run defaults for 1e5-1e7 tokens on a CPU, chosen by a sweep of JumpReLU SAEs on Gemma 3 270M
# resid_post.6 (width 4096, lambda 1e-3, 100k training tokens, FVU and L0 on 20k held-out tokens):
#   lr 7e-5 (published), batch 1024:  L0 780, FVU 1.81 (untrained, as RECIPE 2 "short runs" warns)
#   lr 3e-4, batch 1024:  L0 253, FVU 0.78      lr 1e-3, batch 1024:  L0 162, FVU 0.64
#   lr 3e-3, batch 1024:  L0 116, FVU 0.64      lr 1e-2, batch 1024:  L0 5.5, FVU 0.82
#   lr 1e-3, batch 256:   L0 136, FVU 0.64      lr 3e-3, batch 256:   L0 49,  FVU 0.48
#   lr 1e-2, batch 256:   L0 28,  FVU 0.58
# (3e-3 was the default until longer runs showed it diverging at random steps; see below.)
# Under Adam each parameter, theta included, moves about lr per step, so a short run needs a large
# lr and many small steps for the thresholds to travel from 0.001 to where they belong. Warm-ups
# are scaled to the run length: the published 1k and 10k steps are ~0.1% and 1% of a 4-16B-token
# run and would round to nothing here, so lr warms up over 5% of the steps and lambda over 20%,
# never longer than the published step counts.
SHORT_RUN: dict[str, Any] = {
    # The optimiser (train/optim.py; measured in BENCHMARKS.md, "Training quality against sparsify"):
    # sign descent with schedule-free averaging, thresholds at a tenth of the weights' lr, b_enc and
    # b_dec fixed at 0 and the data mean. At resid_post.6, 300k tokens: FVU 0.064, ΔLM loss 0.6x, 3%
    # dead, no latent over 50%, where Adam (below) with learned biases gives FVU 0.080, 88% dead and
    # 35 always-on latents. lr 3.5e-3 and the STE bandwidth 3e-3 (published: 1e-3) were chosen with
    # the decoder refit and the density limit in place (held-out FVU, same 300k tokens, BENCHMARKS.md
    # "lr and bandwidth"): lr 1e-2 (eai-sparsify's rate at width 4,096, the default before) 0.0728;
    # 5e-3 0.0707; 3.5e-3 0.0702; 2.5e-3 0.0717; with bandwidth 3e-3: 5e-3 0.0703, 3.5e-3 0.0690
    # (and 7% of L0 on latents over 10%, against 14%), 2.5e-3 0.0710; bandwidth 1e-2 and 3e-2 at lr
    # 1e-2: 0.0723 and 0.0731, and slower (the sparse step's window holds more pre-activations).
    "optimizer": "signum",
    "lr_signum": 3.5e-3,
    # A transcoder keeps 1e-2: at mlp_in.6 -> mlp_out.6 (skip, 200k tokens, held-out FVU of the MLP
    # output) lr 1e-2 gives 0.168 at L0 40 where 3.5e-3 gives 0.197 at L0 42 (bandwidth 3e-3 both).
    "lr_signum_transcoder": 1e-2,
    "threshold_lr_ratio": 0.1,
    "bandwidth": 3e-3,
    # Adam ("--optimizer adam"): with b_dec started at the data mean, thresholds started at the
    # target firing rate and beta1 = 0.9, lr 2e-3 at batch 1,024 trains without spikes; runs longer
    # than `long_run_steps` take `lr_long`. (lr 1e-3: FVU 0.088; 2e-3: 0.083; 4e-3: 0.082, 300k tokens.)
    "lr": 2e-3,
    "lr_long": 5e-4,
    "long_run_steps": 3000,
    "batch_size": 1024,
    "lr_warmup_fraction": 0.05,  # Adam only: the averaged sign optimiser needs no schedule
    "lr_decay_fraction": 0.2,  # Adam only: linear decay of lr to 0 over the last 20% of the steps
    "l0_warmup_fraction": 0.0,  # thresholds start at the target rate, so L0 needs no warm-up
    # A latent silent for this many tokens is dead for the pre-activation loss and AuxK (never more
    # than the published 10M): four batches, so a latent firing on fewer than ~1 in 4,000 tokens is
    # pulled back before its threshold drifts out of reach.
    "dead_window_tokens": 4096,
    # Adam with beta1 = 0 (published) at lr 1e-3..2e-3 spiked in 4 of 6 short runs (batch FVU
    # 45-232) and killed latents; beta1 = 0.9 did not (RECIPE.md 2, "short runs").
    "adam_betas": (0.9, 0.999),
}
OPTIMIZERS = ("signum", "adam")
# Under sign descent every element moves by lr whatever its size, so the encoder's starting scale sets
# how far a step turns it. Its columns start at this norm (PyTorch's default Linear init, which
# sparsify keeps) rather than 1: FVU 0.087 against 0.093 at resid_post.6, 300k tokens.
SIGNUM_ENC_INIT_NORM = 3**-0.5
# Gemma Scope 2 target-L0 mode: penalty coefficient * (L0 / L0* - 1)^2. The report gives the form
# (a quadratic penalty around the target L0*), not the coefficient. Same sweep, target 50:
# coefficient 1 ends at held-out L0 49.1, FVU 0.41; coefficient 10 at L0 50.5 but FVU 0.62.
TARGET_L0_COEFF = 1.0
# Latents that die or crowd (RECIPE.md 2, "short runs" and "dead latents"; measured in BENCHMARKS.md):
# - a dead JumpReLU latent (silent for the dead window) gets no gradient from the loss, so nothing
#   brings it back. Anthropic's January 2025 update adds a pre-activation loss ReLU(θ − pre) that
#   pushes its pre-activations up and its threshold down; we apply it to dead latents only, which
#   keeps it cheap (a product over the dead columns alone) and leaves live latents untouched.
# - Gemma Scope 2 penalises latents that fire on more than ~10% of tokens: the penalty here is
#   DENSE_COEFF · Σ ReLU(batch densityᵢ − limit) over the latents whose running density is above the
#   limit (DENSE_DENSITY),
#   its gradient reaching θ through the same straight-through kernel as the L0 term.
# - TopK and BatchTopK get sparsify's AuxK: the k_aux most active dead latents reconstruct what the
#   live ones miss, with coefficient 1/32.
# Both are on by default with the sign optimiser (off with Adam) (measured at resid_post.6, 300k
# tokens, BENCHMARKS.md): the pre-activation loss takes dead latents from 59% to 3%; the dense
# penalty costs FVU (0.064 -> 0.089) but lowers ΔLM loss (0.79 -> 0.67): the dense latents it removes
# spent the dictionary on high-variance directions the model's next-token prediction barely reads.
# Its limit is 9.5%, just under Gemma Scope 2's ~10%. Latents settle just under the limit, and at
# 10% half of them land over it on held-out text; with the decoder refit (below), at resid_post.6,
# 300k tokens, held-out FVU / share of L0 on latents over 10%: limit 5% 0.082 / 0.00, 7.5% 0.076 /
# 0.005, 9% 0.074 / 0.04, 9.5% 0.073 / 0.14, 10% 0.072 / 0.30 (BENCHMARKS.md): 9.5% is the highest
# limit that keeps that share under the 20%, for the best fidelity.
DEAD_PREACT_COEFF = 1e-3
DENSE_DENSITY = 0.095
DENSE_COEFF = 1.0
DENSITY_EVERY = 1  # steps between measurements of every latent's firing rate (one encoder pass)
DENSITY_MOMENTUM = 0.0  # of the running firing rate, per measurement (0: the last batch's rate)
AUXK_COEFF = 1 / 32
INIT_L0 = 50.0  # the L0 thresholds start at when the spec gives λ rather than a target L0 ...
INIT_DENSITY = 0.05  # ... or this fraction of a narrower width
# The spike guard: a batch FVU this many times its running value (after the lr warm-up) means the
# last steps broke the SAE. It goes back to the last checkpoint's weights with half the lr, at most
# MAX_RECOVERIES times, then stops with a message; it never saves a broken SAE as finished.
SPIKE_FACTOR = 10.0
MAX_RECOVERIES = 3
FVU_MOMENTUM = 0.95  # of the running batch FVU the guard compares with
B_DEC_INITS = ("mean", "zero")
BATCHTOPK_THRESHOLD_MOMENTUM = 0.99  # running mean of the smallest kept activation (Bussmann et al.)
# Tokens whose scaled activation norm ‖x/C‖ exceeds this (the RMS norm is 1 after scaling) are left
# out of training, as BOS is. Not in the Gemma Scope report, which covers Gemma 2: Gemma 3 270M has
# "massive activations" on a few ordinary tokens (at resid_post.6, an apostrophe in some contexts:
# 0.05% of tokens at 4-10x the median norm, so 15-100x the squared norm). One such token in a batch
# gives a gradient spike that Adam with beta1 = 0 turns into a full-size step on every weight it
# touches; on 2M-token runs every SAE diverged (FVU > 1) within 1,500 steps. Normal tokens stay
# below 2x the median norm, so 3 keeps all of them. None trains on every token.
MAX_SCALED_NORM = 3.0
FINAL_FRACTION = 0.1  # L0, FVU and densities of a finished SAE are measured on this last part of training
# ... unless the run has held-out activations (`runs.HELDOUT`): then on up to this many of them, which
# names the folder by an L0 no training step has seen (a run saved as l0_98 once had held-out L0 43).
HELDOUT_TOKENS = 16_384
HELDOUT_BATCH = 4096
# The decoder refit (train/refit.py), after the last step: the decoder re-solved by least squares on
# up to REFIT_TOKENS training tokens with the codes fixed. At resid_post.6, 300k tokens: FVU 0.103 ->
# 0.082, ΔLM loss 0.62 -> 0.48 (BENCHMARKS.md). The ridge pulls each row towards its trained value by
# this fraction of the latent's own sum of squares (a latent seen on a handful of tokens keeps part of
# what training gave it; 1e-3 cost 0.0003 of FVU, 1e-2 0.018, against none).
REFIT_TOKENS = 2**19
REFIT_BATCH = 4096
REFIT_FLUSH = 16  # batches summed in float32 before they join the float64 sums
REFIT_MAX_LATENTS = 16_384  # wider SAEs are saved as trained (about 8 GB of normal equations at this width)
REFIT_RIDGE = 1e-4
MATRYOSHKA_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # nested prefixes (TrainSpec.matryoshka)


# ---------------------------------------------------------------------------------------------
# What to train


@dataclass
class TrainSpec:
    """One SAE to train: where it reads, how wide it is, its architecture and how its sparsity is set.

    JumpReLU takes `l0_coeff` (λ, a fixed L0 penalty) or `target_l0` (Gemma Scope 2's quadratic
    penalty around L0*); TopK and BatchTopK take `k`; ReLU takes `l0_coeff` as its L1 coefficient.
    `lr` overrides the run's learning rate for this SAE.

    A transcoder reads `site` and predicts `out_site` (Gemma Scope 2: `mlp_in.L` to `mlp_out.L`,
    `sites.transcoder_sites`), with an affine skip connection when `skip`.

    With `matryoshka` the reconstruction term is the mean over nested prefixes of the dictionary
    (`matryoshka_prefixes`: the first width/16, /8, /4, /2 latents, and all), as in every Gemma
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
        if self.architecture in ("topk", "batchtopk"):
            how = f"k{self.k}"
        elif self.target_l0 is not None:
            how = f"target{self.target_l0:g}"
        else:
            how = f"lam{self.l0_coeff:g}"
        where = self.site if self.out_site is None else f"{self.site}>{self.out_site}"
        kind = self.architecture + ("+skip" if self.skip else "") + ("+matryoshka" if self.matryoshka else "")
        return f"{where}/w{self.width}/{kind}/{how}"

    @property
    def sites(self) -> list[str]:
        """The sites this spec reads: its own, and a transcoder's output site."""
        return [self.site] if self.out_site is None else [self.site, self.out_site]


@dataclass
class TrainConfig:
    """Settings shared by every SAE of one training run. `None` warm-ups and dead window are scaled
    to the run length (see SHORT_RUN); the values used are recorded in each SAE's `cfg.extra`."""

    batch_size: int = SHORT_RUN["batch_size"]
    optimizer: str = SHORT_RUN["optimizer"]  # "signum" (train/optim.py) or "adam" (as published)
    lr: float | None = (
        None  # None: lr_signum, or for Adam SHORT_RUN's lr up to long_run_steps, lr_long beyond
    )
    threshold_lr_ratio: float = SHORT_RUN["threshold_lr_ratio"]  # signum: JumpReLU θ at this x lr
    lr_warmup_steps: int | None = None
    lr_decay_steps: int | None = None  # linear decay of lr to 0 over the last steps (None: 20% of them)
    l0_warmup_steps: int | None = None
    adam_betas: tuple[float, float] = SHORT_RUN["adam_betas"]  # published: (0.0, 0.999)
    bandwidth: float = SHORT_RUN["bandwidth"]  # published: BANDWIDTH (1e-3)
    b_dec_init: str = "mean"  # "mean": the data mean of the first batch; "zero": as published
    threshold_init: float | None = None  # None: θ at each latent's target firing rate; a number: that θ
    target_l0_coeff: float = TARGET_L0_COEFF
    # pre-activation loss on dead JumpReLU latents, penalty on those over `dense_density` (0: off);
    # None: DEAD_PREACT_COEFF and DENSE_COEFF with the sign optimiser, 0 with Adam (not measured there)
    dead_preact_coeff: float | None = None
    dense_coeff: float | None = None
    dense_density: float = DENSE_DENSITY
    auxk_coeff: float = AUXK_COEFF  # TopK / BatchTopK auxiliary loss on dead latents (0: off)
    spike_factor: float = SPIKE_FACTOR  # batch FVU over this x its running value: a spike (0: no guard)
    dead_window_tokens: int | None = None
    max_norm: float | None = MAX_SCALED_NORM  # skip tokens with ‖x/C‖ above this (massive activations)
    refit_tokens: int = REFIT_TOKENS  # the decoder refit after the last step, on this many tokens (0: off)
    seed: int = 0
    buffer_tokens: int = 2**18
    fast: bool = True  # JumpReLU terms from gemmascope.sparse_step (same values and gradients)
    parallel: str = "data"  # under torchrun: "data" (ranks split each batch) or "sae" (split the SAEs)
    device: str = "cpu"  # "cuda": under torchrun each process trains on its own GPU (LOCAL_RANK)
    name: str = "train"  # checkpoints in run_dir/checkpoints/NAME, logs in run_dir/report/NAME_*
    checkpoint_every: int = 50  # steps
    log_every: int = 10  # steps


# ---------------------------------------------------------------------------------------------
# The recipe's pieces


def jumprelu_terms(
    sae: JumpReLUSAE,
    x: Tensor,
    bandwidth: float,
    target: Tensor | None = None,
    prefixes: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The two terms of the JumpReLU loss on a batch `x [batch, d_in]` already divided by C.

    The encoder sees `sae.centered(x)` (the pre-encoder bias). Returns `recon` (mean over the batch
    of ‖target − x̂‖², summed over d_in; the target is `x` itself for an SAE, the output site's
    `target [batch, d_in]` for a transcoder, whose x̂ includes its skip connection; with Matryoshka
    `prefixes`, `nested_recon`'s mean over the nested reconstructions), `l0` (mean over the batch of
    Σᵢ H(preᵢ − θᵢ), whose gradient goes to θ only, through the rectangle-kernel pseudo-derivative)
    and `fired [d_sae]` (bool: the latent was active on some token of the batch).
    This is the plain reference; `sparse_step.jumprelu_terms_sparse` is the fast path for SAEs with
    the same values and gradients."""
    pre_acts = sae.pre_acts(sae.centered(x))  # [batch, d_sae]
    f = jumprelu(pre_acts, sae.threshold, bandwidth)
    y = x if target is None else target
    recon = nested_recon(f, sae.W_dec, y - sae.b_dec - sae.skip(x), prefixes)
    active = step(pre_acts, sae.threshold, bandwidth)  # [batch, d_sae] floats 0/1
    l0 = active.sum(-1).mean()
    fired = (active > 0).any(0)
    return recon, l0, fired


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


def matryoshka_prefixes(width: int) -> tuple[int, ...]:
    """The nested dictionary sizes of a Matryoshka SAE of `width` latents: width/16, /8, /4, /2 and
    the whole (MATRYOSHKA_FRACTIONS; Gemma Scope 2 does not publish its own)."""
    sizes = {max(1, round(width * fraction)) for fraction in MATRYOSHKA_FRACTIONS}
    return tuple(sorted(sizes | {width}))


# The signature of the JumpReLU loss terms: this reference or `sparse_step.jumprelu_terms_sparse`
# (sae, x, bandwidth, target, prefixes).
TermsFn = Callable[
    [JumpReLUSAE, Tensor, float, Tensor | None, tuple[int, ...] | None], tuple[Tensor, Tensor, Tensor]
]


def init_sae(sae: SAE, generator: torch.Generator, threshold_init: float = THRESHOLD_INIT) -> SAE:
    """RECIPE 2 init: W_dec He-uniform, then each row scaled to unit norm; W_enc = W_decᵀ (untied
    afterwards); b_enc = b_dec = 0; JumpReLU θ = `threshold_init` (0.001)."""
    with torch.no_grad():
        w_dec = torch.empty(sae.d_sae, sae.d_in)
        torch.nn.init.kaiming_uniform_(w_dec, generator=generator)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.fill_(threshold_init)
    return sae


# A transcoder's affine skip connection starts as the ridge regression of the output site on the
# input site over the first batches (SKIP_FIT_BATCHES of them), SKIP_RIDGE x the mean eigenvalue of the
# input covariance as the ridge. Measured on Gemma 3 270M (held-out FVU of the skip alone; 4,096
# tokens): layer 6 0.28, layer 12 0.54, where the skip learned by sign descent from 0 over 200k tokens
# left whole transcoders at 0.60 and 0.64. With the optimiser it then stays fixed (`optim`): the
# latents learn what the linear map misses.
SKIP_FIT_BATCHES = 4
SKIP_RIDGE = 0.1


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

    With the sign optimiser, W_enc's columns are scaled to SIGNUM_ENC_INIT_NORM. `b_dec` at the data
    mean (as sparsify does): at resid_post.6 of Gemma 3 270M the mean holds ~90%
    of E‖x‖², and from 0 a short run spends itself getting there while latents die or turn into
    always-on stand-ins for the mean. JumpReLU thresholds at the pre-activation each latent exceeds
    on `init_l0 / width` of the batch (Anthropic's 2025 "b_enc at a target firing rate", set through
    θ), so L0 starts at its target instead of at most of the width."""
    with torch.no_grad():
        if cfg.optimizer == "signum":
            sae.W_enc.mul_(SIGNUM_ENC_INIT_NORM)
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
        if isinstance(sae, JumpReLUSAE) and cfg.threshold_init is None:
            pre_acts = sae.pre_acts(sae.centered(x))  # [batch, d_sae]
            k = min(x.shape[0] - 1, max(1, round(init_l0 / sae.d_sae * x.shape[0])))
            top = pre_acts.topk(k + 1, dim=0).values  # [k + 1, d_sae]
            # halfway between the k-th and (k+1)-th largest: no token sits on the threshold's edge
            sae.threshold.copy_((0.5 * (top[k - 1] + top[k])).clamp_min(THRESHOLD_FLOOR))
    return sae


def dead_preact_loss(sae: JumpReLUSAE, x: Tensor, dead: Tensor) -> Tensor:
    """Anthropic's pre-activation loss on the `dead [d_sae]` (bool) latents only: the batch mean of
    Σᵢ ReLU(θᵢ − preᵢ) over them (decoder rows have unit norm), on `x [batch, d_in]` (already / C).
    Its gradient raises their pre-activations and lowers their thresholds until they fire again."""
    index = dead.nonzero().squeeze(1)
    pre_acts = sae.centered(x) @ sae.W_enc[:, index] + sae.b_enc[index]  # [batch, n_dead]
    return torch.relu(sae.threshold[index] - pre_acts).sum(-1).mean()


def dense_penalty(
    sae: JumpReLUSAE,
    x: Tensor,
    dense: Tensor,
    limit: float,
    bandwidth: float,
    share: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Gemma Scope 2's penalty on latents that fire too often: Σᵢ ReLU(densityᵢ − `limit`) over the
    `dense [d_sae]` (bool) latents, densityᵢ their firing rate on the batch `x [batch, d_in]` (already
    / C), differentiable in θ through the straight-through step (as the L0 term). `share` turns a
    data-parallel rank's densities into the whole batch's (the penalty is not linear in them)."""
    index = dense.nonzero().squeeze(1)
    pre_acts = sae.centered(x) @ sae.W_enc[:, index] + sae.b_enc[index]  # [batch, n_dense]
    density = step(pre_acts, sae.threshold[index], bandwidth).mean(0)  # [n_dense]
    if share is not None:
        density = share(density)
    return torch.relu(density - limit).sum()


def auxk_loss(sae: SAE, x: Tensor, residual: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """sparsify's AuxK for TopK SAEs: the `k_aux` most active `dead [d_sae]` latents of each token
    reconstruct the live latents' error `residual [batch, d_in]` (detached), as a fraction of its
    variance, so dead latents learn something useful to come back with."""
    index = dead.nonzero().squeeze(1)
    pre_acts = torch.relu(sae.centered(x) @ sae.W_enc[:, index] + sae.b_enc[index])  # [batch, n_dead]
    values, which = pre_acts.topk(min(k_aux, index.numel()), dim=-1)
    f = torch.zeros_like(pre_acts).scatter(-1, which, values)
    error = residual - f @ sae.W_dec[index]
    return error.pow(2).sum(-1).mean() / (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)


def fold_scaling(sae: SAE, scale: float, out_scale: float | None = None) -> SAE:
    """The SAE for raw activations of one trained on `x / scale` with the pre-encoder bias (RECIPE 2,
    folding): b_enc' = C·(b_enc − bias @ W_enc) with bias `b_dec` (a transcoder: `b_in`, then 0),
    b_dec' = C·b_dec, θ' = C·θ, W_enc and W_dec unchanged. On raw x it gives the training-time
    latents and reconstruction times C. A transcoder trained to predict `y / out_scale` has W_dec'
    and W_skip' times out_scale / scale and b_dec' = out_scale·b_dec: on raw x it predicts raw y."""
    out_scale = scale if out_scale is None else out_scale
    folded = build_sae(SAEConfig(**sae.cfg.to_dict()))
    ratio = out_scale / scale
    with torch.no_grad():
        folded.W_enc.copy_(sae.W_enc)
        folded.W_dec.copy_(ratio * sae.W_dec)
        folded.b_enc.copy_(scale * (sae.b_enc - sae.pre_encoder_bias() @ sae.W_enc))
        folded.b_dec.copy_(out_scale * sae.b_dec)
        if sae.W_skip is not None and folded.W_skip is not None:
            folded.W_skip.copy_(ratio * sae.W_skip)
        if isinstance(sae, (JumpReLUSAE, BatchTopKSAE)):
            folded.threshold.copy_(scale * sae.threshold)  # type: ignore[operator]
    return folded


def lr_at(step_index: int, lr: float, warmup_steps: int, decay_steps: int = 0, n_steps: int = 0) -> float:
    """Cosine warm-up from 0.1·lr to lr over the first `warmup_steps` steps (RECIPE 2), then lr, then
    (short runs) a linear decay to 0 over the last `decay_steps` of the run's `n_steps`."""
    if step_index < warmup_steps:
        progress = step_index / warmup_steps
        return lr * (LR_WARMUP_START + (1 - LR_WARMUP_START) * 0.5 * (1 - math.cos(math.pi * progress)))
    if decay_steps and step_index >= n_steps - decay_steps:
        return lr * (n_steps - step_index) / (decay_steps + 1)
    return lr


def sparsity_coeff_at(step_index: int, coeff: float, warmup_steps: int) -> float:
    """Linear warm-up of the sparsity coefficient from 0 to `coeff` over `warmup_steps` (RECIPE 2)."""
    if step_index >= warmup_steps:
        return coeff
    return coeff * step_index / warmup_steps


def remove_parallel_grad(W_dec: torch.nn.Parameter) -> None:
    """Remove from each row's gradient its component along that row, before the optimiser step
    (RECIPE 2, decoder): rows are unit norm in training; a loaded SAE's, fine-tuned, need not be."""
    if W_dec.grad is not None:
        with torch.no_grad():  # outside no_grad the gradient would grow an autograd graph each step
            w = W_dec.detach()
            along = (W_dec.grad * w).sum(-1, keepdim=True) / w.pow(2).sum(-1, keepdim=True).clamp_min(1e-24)
            W_dec.grad -= along * w


# ---------------------------------------------------------------------------------------------
# Checking the specs and planning the run


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
    if spec.architecture not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {spec.architecture!r}: expected one of {ARCHITECTURES}")
    if not isinstance(spec.width, int) or spec.width < 1:
        raise ConfigError(f"width {spec.width!r} of {spec.site} must be a positive whole number of latents")

    def positive(name: str, value: float | None, allow_zero: bool = False) -> None:
        ok = value is not None and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
        if not ok:
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(
                f"{name} {value!r} of a {spec.architecture} SAE must be a finite number {bound}"
            )

    if spec.architecture == "jumprelu":
        if (spec.l0_coeff is None) == (spec.target_l0 is None):
            raise ConfigError(
                "a jumprelu SAE needs exactly one of l0_coeff (λ) or target_l0, "
                f"got l0_coeff={spec.l0_coeff!r}, target_l0={spec.target_l0!r}"
            )
        if spec.l0_coeff is not None:
            positive("l0_coeff", spec.l0_coeff, allow_zero=True)
        else:
            positive("target_l0", spec.target_l0)
            if float(spec.target_l0 or 0) >= spec.width:
                raise ConfigError(f"target_l0 {spec.target_l0} must be below the width {spec.width}")
    elif spec.architecture in ("topk", "batchtopk"):
        if not isinstance(spec.k, int) or not 0 < spec.k <= spec.width:
            raise ConfigError(
                f"{spec.architecture} needs a whole k with 0 < k <= width {spec.width}, got {spec.k!r}"
            )
        if spec.l0_coeff is not None or spec.target_l0 is not None:
            raise ConfigError(f"{spec.architecture} sets its sparsity with k only, not l0_coeff or target_l0")
    else:  # relu
        positive("l0_coeff (the L1 coefficient)", spec.l0_coeff)
    if spec.lr is not None:
        positive("lr", spec.lr)
    return TrainSpec(**{**asdict(spec), "site": site, "out_site": out_site})


def checked_config(cfg: TrainConfig) -> None:
    """A ConfigError naming the first setting of `cfg` that makes no sense."""

    def finite(name: str, value: float, low: float, high: float = math.inf) -> None:
        if not (math.isfinite(value) and low <= value <= high):
            raise ConfigError(f"{name} {value!r} must be a finite number in [{low:g}, {high:g}]")

    check_name(cfg.name, "training run name")  # its checkpoint and log stay inside the run folder
    if cfg.batch_size < 1:
        raise ConfigError(f"batch size {cfg.batch_size} must be at least 1")
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
    finite("dense_density", cfg.dense_density, 1e-6, 1.0)
    if cfg.refit_tokens < 0:
        raise ConfigError(f"refit_tokens {cfg.refit_tokens!r} must be 0 (no refit) or a number of tokens")
    if cfg.spike_factor != 0:
        finite("spike_factor (0 turns the guard off)", cfg.spike_factor, 1.5)


def run_plan(store: ActivationStore, specs: list[TrainSpec], tokens: int, cfg: TrainConfig) -> dict[str, Any]:
    """Steps, epochs and the warm-ups and dead window scaled to this run's length."""
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
    scheduled = cfg.optimizer == "adam"  # the averaged sign optimiser needs no warm-up or decay
    lr_warmup = cfg.lr_warmup_steps
    if lr_warmup is None:
        fraction = SHORT_RUN["lr_warmup_fraction"] if scheduled else 0.0
        lr_warmup = min(PUBLISHED["lr_warmup_steps"], round(fraction * steps))
    l0_warmup = cfg.l0_warmup_steps
    if l0_warmup is None:
        l0_warmup = min(PUBLISHED["l0_warmup_steps"], round(SHORT_RUN["l0_warmup_fraction"] * steps))
    dead_window = cfg.dead_window_tokens
    if dead_window is None:
        dead_window = min(
            PUBLISHED["dead_window_tokens"], max(cfg.batch_size, SHORT_RUN["dead_window_tokens"])
        )
    lr_decay = cfg.lr_decay_steps
    if lr_decay is None:
        lr_decay = round(SHORT_RUN["lr_decay_fraction"] * steps) if scheduled else 0
    if lr_warmup < 0 or l0_warmup < 0 or lr_decay < 0 or dead_window < 1:
        raise ConfigError(
            f"warm-ups must be >= 0 steps and the dead window >= 1 token, got {lr_warmup}, {l0_warmup}, {dead_window}"
        )
    return {
        "steps": steps,
        "epochs": math.ceil(steps / per_epoch),
        "store_tokens": available,
        "lr_warmup_steps": lr_warmup,
        "lr_decay_steps": min(lr_decay, max(0, steps - lr_warmup)),
        "l0_warmup_steps": l0_warmup,
        "dead_window_tokens": dead_window,
        "final_steps": max(1, round(FINAL_FRACTION * steps)),
    }


def with_spec_defaults(specs: list[TrainSpec], cfg: TrainConfig) -> list[TrainSpec]:
    """The specs with what depends on their kind set, unless the spec or the run gives it: a
    transcoder's learning rate under the sign optimiser (`lr_signum_transcoder`, not `lr_signum`)."""
    if cfg.optimizer != "signum" or cfg.lr is not None:
        return specs
    return [
        dataclasses.replace(spec, lr=SHORT_RUN["lr_signum_transcoder"])
        if spec.out_site is not None and spec.lr is None
        else spec
        for spec in specs
    ]


def with_run_defaults(cfg: TrainConfig, steps: int) -> TrainConfig:
    """`cfg` with what depends on the optimiser and the run length set, unless given: the learning
    rate (`lr_signum` for the sign optimiser; for Adam SHORT_RUN's `lr` for runs up to
    `long_run_steps` steps and the lower, stable `lr_long` beyond) and the dead and dense penalties'
    coefficients (on with the sign optimiser, where they were measured; off with Adam)."""
    signum = cfg.optimizer == "signum"
    lr = cfg.lr
    if lr is None:
        long_run = steps > SHORT_RUN["long_run_steps"]
        lr = SHORT_RUN["lr_signum"] if signum else SHORT_RUN["lr_long"] if long_run else SHORT_RUN["lr"]
    dead = (
        cfg.dead_preact_coeff if cfg.dead_preact_coeff is not None else DEAD_PREACT_COEFF if signum else 0.0
    )
    dense = cfg.dense_coeff if cfg.dense_coeff is not None else DENSE_COEFF if signum else 0.0
    return dataclasses.replace(cfg, lr=lr, dead_preact_coeff=dead, dense_coeff=dense)
