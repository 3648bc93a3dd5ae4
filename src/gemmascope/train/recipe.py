"""The Gemma Scope training recipe (RECIPE.md section 2) as typed values: the numbers exactly as
published (`PUBLISHED`, a frozen `Published`) beside the short-run ones measured here for 1e5-1e7
tokens on a CPU (`SHORT_RUN`, a frozen `ShortRun`), each field saying where it comes from; the
constants of the loop's mechanics; and the small pure functions every step uses (the lr and sparsity
warm-ups, the decoder-gradient projection, Matryoshka's nested sizes).

What a run asks for (`TrainSpec`, `TrainConfig`) and how its open values are worked out from these
(`resolve`) is `config`'s; an architecture's own loss terms are its file's (`gemmascope.architectures`).
Knows nothing of the training loop, optimiser state, checkpoints, logs, files or processes. Both the
published values and every value a run used are written into each saved SAE's `cfg.extra`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------
# The recipe's values


@dataclass(frozen=True)
class Published:
    """Gemma Scope, arXiv 2408.05147, section 3 (RECIPE 2), exactly as published; tuned for 4-16B
    tokens per SAE. Recorded in every saved SAE's `cfg.extra["published"]`."""

    lr: float = 7e-5
    """Adam's learning rate."""
    lr_warmup_steps: int = 1_000
    """Cosine warm-up of lr from 0.1·lr to lr."""
    l0_warmup_steps: int = 10_000
    """Linear warm-up of the sparsity coefficient from 0 to λ."""
    batch_size: int = 4_096
    """Activations per step."""
    adam_betas: tuple[float, float] = (0.0, 0.999)
    """Adam's betas (β₁ = 0)."""
    adam_eps: float = 1e-8
    """Adam's epsilon."""
    bandwidth: float = 0.001
    """ε of the rectangle kernel of the threshold's pseudo-derivatives; valid because E‖x‖² = 1."""
    threshold_init: float = 0.001
    """θ at init, a raw fp32 parameter."""
    dead_window_tokens: int = 10_000_000
    """A latent silent for this many tokens is dead."""

    def to_json(self) -> dict[str, Any]:
        """The values as `cfg.extra["published"]` keeps them (tuples as lists)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}


@dataclass(frozen=True)
class ShortRun:
    """The short-run defaults for 1e5-1e7 tokens on a CPU, each measured here (BENCHMARKS.md) on
    Gemma 3 270M, mostly JumpReLU SAEs at `resid_post.6` (width 4,096, 300k training tokens, FVU and
    L0 on held-out tokens). Under Adam each parameter, θ included, moves about lr per step, so at the
    published lr 7e-5 a short run leaves the SAE untrained (L0 780, FVU 1.81 at 100k tokens, as
    RECIPE 2 "short runs" warns); the published warm-ups (~0.1% and 1% of a 4-16B-token run) round to
    nothing here."""

    optimizer: str = "signum"
    """Sign descent with schedule-free averaging (train/optim.py), thresholds at a tenth of the
    weights' lr, b_enc and b_dec fixed at 0 and the data mean: at 300k tokens FVU 0.064, 3% dead, no
    latent over 50%, where Adam with learned biases gives FVU 0.080, 88% dead and 35 always-on latents
    (BENCHMARKS.md, "Training quality against sparsify")."""
    lr_signum: float = 3.5e-3
    """The sign optimiser's lr, chosen with the decoder refit and the density limit in place
    (held-out FVU, BENCHMARKS.md "lr and bandwidth"): lr 1e-2 (eai-sparsify's rate at width 4,096,
    the default before) 0.0728; 5e-3 0.0707; 3.5e-3 0.0702; 2.5e-3 0.0717; with bandwidth 3e-3:
    5e-3 0.0703, 3.5e-3 0.0690 (and 7% of L0 on latents over 10%, against 14%), 2.5e-3 0.0710."""
    lr_signum_transcoder: float = 1e-2
    """A transcoder keeps 1e-2: at mlp_in.6 -> mlp_out.6 (skip, 200k tokens, held-out FVU of the MLP
    output) lr 1e-2 gives 0.168 at L0 40 where 3.5e-3 gives 0.197 at L0 42 (bandwidth 3e-3 both)."""
    threshold_lr_ratio: float = 0.1
    """Under the sign optimiser the JumpReLU thresholds train at this times lr."""
    bandwidth: float = 3e-3
    """The STE bandwidth (published 1e-3), chosen with lr_signum: 1e-2 and 3e-2 at lr 1e-2 gave 0.0723
    and 0.0731, and are slower (the sparse step's window holds more pre-activations)."""
    lr: float = 2e-3
    """Adam's lr: with b_dec started at the data mean, thresholds at the target firing rate and
    β₁ = 0.9, 2e-3 at batch 1,024 trains without spikes (lr 1e-3: FVU 0.088; 2e-3: 0.083; 4e-3:
    0.082, 300k tokens). The sweep at the published settings, batch 1,024, 100k tokens: lr 3e-4 L0
    253 FVU 0.78; 1e-3 L0 162 FVU 0.64; 3e-3 L0 116 FVU 0.64 (diverged at random steps in longer
    runs); 1e-2 L0 5.5 FVU 0.82."""
    lr_long: float = 5e-4
    """Adam's lr for runs longer than `long_run_steps` (stable where 2e-3 and 3e-3 spiked)."""
    long_run_steps: int = 3000
    """Adam: runs over this many steps take `lr_long`."""
    batch_size: int = 1024
    """Activations per step (published 4,096): more, smaller steps for θ to travel far enough. Batch
    2,048 at lr 5e-3 trains in 0.7 of the time with held-out ΔLM loss 0.660 against 0.670 at
    resid_post.12, 300k tokens, but its one demo SAE read concepts worse than the batch-1,024 one
    before it (the same topic latents, each less sharp: held-out F1 food 0.90 -> 0.75, music 0.88 ->
    0.79; detection 4 and steering 2 of the concept benchmark's 14, against 7 and 7; BENCHMARKS.md
    "Training speed"). One SAE each, and the headlines vary as much between draws of one recipe, so
    it waits for a several-seed comparison: not the default."""
    lr_warmup_fraction: float = 0.05
    """Adam only: lr warms up over this share of the steps (at most the published 1,000); the
    averaged sign optimiser needs no schedule."""
    lr_decay_fraction: float = 0.2
    """Adam only: lr decays linearly to 0 over this last share of the steps."""
    l0_warmup_fraction: float = 0.0
    """Thresholds start at the target firing rate, so the sparsity needs no warm-up."""
    dead_window_tokens: int = 4096
    """A latent silent for this many tokens is dead for the pre-activation loss and AuxK (never more
    than the published 10M, never less than a batch): four batches, so a latent firing on fewer than
    ~1 in 4,000 tokens is pulled back before its threshold drifts out of reach."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam with β₁ = 0 (published) at lr 1e-3..2e-3 spiked in 4 of 6 short runs (batch FVU 45-232)
    and killed latents; β₁ = 0.9 did not (RECIPE.md 2, "short runs")."""
    b_dec_init: str = "mean"
    """b_dec at the mean of the first batch (as sparsify does; published: 0): at resid_post.6 the
    mean holds ~90% of E‖x‖², and from 0 a short run spends itself getting there while latents die or
    turn into always-on stand-ins for the mean."""
    signum_enc_init_norm: float = 3**-0.5
    """Under sign descent every element moves by lr whatever its size, so the encoder's starting scale
    sets how far a step turns it; its columns start at this norm (PyTorch's Linear init, which
    sparsify keeps) rather than 1: FVU 0.087 against 0.093."""
    target_l0_coeff: float = 1.0
    """Gemma Scope 2's target-L0 penalty coefficient·(L0/L0* − 1)²; the report gives the form, not the
    coefficient. Target 50: coefficient 1 ends at held-out L0 49.1, FVU 0.41; 10 at L0 50.5, FVU 0.62."""
    dead_preact_coeff: float = 1e-3
    """Anthropic's January 2025 pre-activation loss ReLU(θ − pre) on dead JumpReLU latents only (a
    dead latent gets no gradient from the loss, so nothing else brings it back): dead latents 59% ->
    3%. On with the sign optimiser, off with Adam (not measured there)."""
    dense_coeff: float = 1.0
    """Gemma Scope 2's penalty Σ ReLU(densityᵢ − dense_density) on latents whose running density is
    above the limit, its gradient reaching θ through the L0 term's kernel: FVU 0.064 -> 0.089 but ΔLM
    loss 0.79 -> 0.67 (the dense latents spent the dictionary on directions the next-token prediction
    barely reads). On with the sign optimiser, off with Adam."""
    dense_density: float = 0.095
    """The dense penalty's limit for runs under `dense_long_tokens` training tokens, just under Gemma
    Scope 2's ~10%: with the refit, held-out FVU / share of L0 on latents over 10% (resid_post.6, 300k
    tokens): 5% 0.082 / 0.00, 7.5% 0.076 / 0.005, 9% 0.074 / 0.04, 9.5% 0.073 / 0.14, 10% 0.072 /
    0.30: 9.5% is the highest limit that keeps that share under 20%."""
    dense_density_long: float = 0.03
    """The limit from `dense_long_tokens` training tokens (steps x batch) on: the topic latents of a
    middle layer are context latents that settle just under the limit, and a lower one splits them
    into narrower ones at no ΔLM cost (one draw per limit: level within noise).
    resid_post.12, 1.46M tokens (Wikipedia + sampled text), limit 9.5% / 5% / 3% / 2%: held-out ΔLM
    loss 0.523 / 0.526 / 0.517 / 0.499, FVU 0.174 / 0.185 / 0.193 / 0.200, share of L0 on latents
    over 10% 0.21 / 0.009 / 0 / 0, concepts detected at F1 >= 0.8 (BENCHMARKS.md "Concepts") 5 / 9 /
    9 / 7 of 14. At 300k tokens 9.5% and 3% draw level (ΔLM 0.733 / 0.740, 6 / 7 of 14)."""
    dense_long_tokens: int = 1_000_000
    """Runs of at least this many training tokens take `dense_density_long`."""
    auxk_coeff: float = 1 / 32
    """sparsify's AuxK for TopK and BatchTopK: the k_aux most active dead latents reconstruct what the
    live ones miss."""
    init_l0: float = 50.0
    """The L0 the thresholds start at when a spec gives λ rather than a target L0 (Gemma Scope's
    "medium" SAEs end near it) ..."""
    init_density: float = 0.05
    """... or this fraction of a narrower width."""
    spike_factor: float = 10.0
    """The spike guard: a batch FVU this many times its running value (after the lr warm-up) means the
    last steps broke the SAE; it goes back to its last good state (every `GOOD_EVERY` steps) with half
    the lr."""
    max_scaled_norm: float = 3.0
    """Tokens whose scaled norm ‖x/C‖ exceeds this are left out of training, as BOS is. Not in the
    report, which covers Gemma 2: Gemma 3 270M has massive activations on a few ordinary tokens (at
    resid_post.6, an apostrophe in some contexts: 0.05% of tokens at 4-10x the median norm); one in a
    batch made Adam with β₁ = 0 diverge on every 2M-token run. Normal tokens stay below 2x."""
    refit_tokens: int = 2**19
    """The decoder refit after the last step (train/refit.py), least squares on up to this many
    training tokens with the codes fixed: FVU 0.103 -> 0.082, ΔLM loss 0.62 -> 0.48."""


PUBLISHED = Published()
SHORT_RUN = ShortRun()
OPTIMIZERS = ("signum", "adam")
B_DEC_INITS = ("mean", "zero")

# Names other modules read these by.
BANDWIDTH = PUBLISHED.bandwidth
THRESHOLD_INIT = PUBLISHED.threshold_init
ADAM_BETAS = PUBLISHED.adam_betas
ADAM_EPS = PUBLISHED.adam_eps
TARGET_L0_COEFF = SHORT_RUN.target_l0_coeff
DEAD_PREACT_COEFF = SHORT_RUN.dead_preact_coeff
DENSE_COEFF = SHORT_RUN.dense_coeff
DENSE_DENSITY = SHORT_RUN.dense_density
MAX_SCALED_NORM = SHORT_RUN.max_scaled_norm
REFIT_TOKENS = SHORT_RUN.refit_tokens

# ---------------------------------------------------------------------------------------------
# The loop's mechanics

LR_WARMUP_START = 0.1  # the lr warm-up starts at 0.1 * lr (Gemma Scope section 3)
DENSITY_EVERY = 1  # steps between updates of every latent's firing rate (read from the step's forward)
DENSITY_MOMENTUM = 0.0  # of the running firing rate, per measurement (0: the last batch's rate)
MAX_RECOVERIES = 3  # spikes the guard recovers from before it stops with a message (nothing saved)
GOOD_EVERY = 50  # steps between the states a spike goes back to (kept in memory; and at each checkpoint)
FVU_MOMENTUM = 0.95  # of the running batch FVU the guard compares with
FINAL_FRACTION = 0.1  # L0, FVU and densities of a finished SAE are measured on this last part of training
# ... unless the run has held-out activations (`runs.HELDOUT`): then on up to this many of them, which
# names the folder by an L0 no training step has seen (a run saved as l0_98 once had held-out L0 43).
HELDOUT_TOKENS = 16_384
HELDOUT_BATCH = 4096
MATRYOSHKA_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # nested prefixes (TrainSpec.matryoshka)


# ---------------------------------------------------------------------------------------------
# What every step uses


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
            norm2 = torch.linalg.vector_norm(w, dim=-1).square().clamp_min(1e-24)  # [rows]
            along = torch.linalg.vecdot(W_dec.grad, w) / norm2  # [rows]
            W_dec.grad.addcmul_(along[:, None], w, value=-1.0)


def matryoshka_prefixes(width: int) -> tuple[int, ...]:
    """The nested dictionary sizes of a Matryoshka SAE of `width` latents: width/16, /8, /4, /2 and
    the whole (MATRYOSHKA_FRACTIONS; Gemma Scope 2 does not publish its own)."""
    sizes = {max(1, round(width * fraction)) for fraction in MATRYOSHKA_FRACTIONS}
    return tuple(sorted(sizes | {width}))
