"""Training SAEs with the Gemma Scope recipe. Owns RECIPE.md section 2: the input scaling (activations
divided by the store's C so that E‖x‖² = 1), the pre-encoder bias, the JumpReLU loss with its
straight-through pseudo-derivatives, the initialisation, unit-norm decoder rows, Adam with the lr and
sparsity warm-ups, fixed-λ and target-L0 sparsity; training several SAEs (widths, λs, sites) from one
pass over the activation store; checkpoints and bit-exact resume; the training log and its plot; and
folding the input scaling into the saved weights.

Knows nothing of the model: it reads activations from `activations.ActivationStore` only.

Where the constants come from (Gemma Scope, arXiv 2408.05147, section 3, condensed in RECIPE.md 2):
the published value is kept beside every short-run default chosen here (see `PUBLISHED` and
`SHORT_RUN`), and both are written into every saved SAE's `cfg.extra`.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from gemmascope.activations import ActivationStore
from gemmascope.errors import ConfigError, GemmaScopeError, StoreError
from gemmascope.formats import load_sae, sae_dir, save_sae
from gemmascope.models import Site, parse_site
from gemmascope.sae import ARCHITECTURES, SAE, BatchTopKSAE, JumpReLUSAE, SAEConfig, build_sae, jumprelu, step

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
    # Default learning rate by run length (measured on Gemma 3 270M resid_post.6, batch 256, see
    # BENCHMARKS.md): 3e-3 converges in a few hundred steps but can diverge (one step with FVU ~1e5,
    # then FVU > 1) after 400 to 2,000 steps; 2e-3 was stable in four 1,171-1,500-step runs (training
    # FVU 0.21-0.25 at L0 45, against 0.36 at 1e-3); 5e-4 is stable over 7,812 steps but slow for
    # short runs. Runs up to `long_run_steps` take `lr`, longer ones `lr_long`.
    "lr": 2e-3,
    "lr_long": 5e-4,
    "long_run_steps": 1500,
    "batch_size": 256,
    "lr_warmup_fraction": 0.05,
    "l0_warmup_fraction": 0.2,
    "dead_window_fraction": 0.25,  # of the run's tokens, never more than the published 10M
}
# Gemma Scope 2 target-L0 mode: penalty coefficient * (L0 / L0* - 1)^2. The report gives the form
# (a quadratic penalty around the target L0*), not the coefficient. Same sweep, target 50:
# coefficient 1 ends at held-out L0 49.1, FVU 0.41; coefficient 10 at L0 50.5 but FVU 0.62.
TARGET_L0_COEFF = 1.0
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


# ---------------------------------------------------------------------------------------------
# What to train


@dataclass
class TrainSpec:
    """One SAE to train: where it reads, how wide it is, its architecture and how its sparsity is set.

    JumpReLU takes `l0_coeff` (λ, a fixed L0 penalty) or `target_l0` (Gemma Scope 2's quadratic
    penalty around L0*); TopK and BatchTopK take `k`; ReLU takes `l0_coeff` as its L1 coefficient.
    `lr` overrides the run's learning rate for this SAE."""

    site: str
    width: int
    architecture: str = "jumprelu"
    l0_coeff: float | None = None
    target_l0: float | None = None
    k: int | None = None
    lr: float | None = None

    @property
    def name(self) -> str:
        """A short label for logs: `resid_post.6/w4096/jumprelu/lam0.001`."""
        if self.architecture in ("topk", "batchtopk"):
            how = f"k{self.k}"
        elif self.target_l0 is not None:
            how = f"target{self.target_l0:g}"
        else:
            how = f"lam{self.l0_coeff:g}"
        return f"{self.site}/w{self.width}/{self.architecture}/{how}"


@dataclass
class TrainConfig:
    """Settings shared by every SAE of one training run. `None` warm-ups and dead window are scaled
    to the run length (see SHORT_RUN); the values used are recorded in each SAE's `cfg.extra`."""

    batch_size: int = SHORT_RUN["batch_size"]
    lr: float | None = None  # None: SHORT_RUN's lr for runs up to long_run_steps, lr_long beyond
    lr_warmup_steps: int | None = None
    l0_warmup_steps: int | None = None
    bandwidth: float = BANDWIDTH
    threshold_init: float = THRESHOLD_INIT
    target_l0_coeff: float = TARGET_L0_COEFF
    dead_window_tokens: int | None = None
    max_norm: float | None = MAX_SCALED_NORM  # skip tokens with ‖x/C‖ above this (massive activations)
    seed: int = 0
    buffer_tokens: int = 2**18
    fast: bool = False  # JumpReLU terms from gemmascope.sparse_step (same values and gradients)
    parallel: str = "data"  # under torchrun: "data" (ranks split each batch) or "sae" (split the SAEs)
    device: str = "cpu"  # "cuda": under torchrun each process trains on its own GPU (LOCAL_RANK)
    name: str = "train"  # checkpoints in run_dir/checkpoints/NAME, logs in run_dir/report/NAME_*
    checkpoint_every: int = 50  # steps
    log_every: int = 10  # steps


# ---------------------------------------------------------------------------------------------
# The recipe's pieces


def jumprelu_terms(sae: JumpReLUSAE, x: Tensor, bandwidth: float) -> tuple[Tensor, Tensor, Tensor]:
    """The two terms of the JumpReLU loss on a batch `x [batch, d_in]` already divided by C.

    The encoder sees `x - b_dec` (the pre-encoder bias). Returns `recon` (mean over the batch of
    ‖x − x̂‖², summed over d_in), `l0` (mean over the batch of Σᵢ H(preᵢ − θᵢ), whose gradient goes to
    θ only, through the rectangle-kernel pseudo-derivative) and `fired [d_sae]` (bool: the latent was
    active on some token of the batch). This is the plain reference; `sparse_step.jumprelu_terms_sparse`
    is the fast path with the same signature, values and gradients."""
    pre_acts = sae.pre_acts(x - sae.b_dec)  # [batch, d_sae]
    f = jumprelu(pre_acts, sae.threshold, bandwidth)
    x_hat = sae.decode(f)
    recon = (x - x_hat).pow(2).sum(-1).mean()
    active = step(pre_acts, sae.threshold, bandwidth)  # [batch, d_sae] floats 0/1
    l0 = active.sum(-1).mean()
    fired = (active > 0).any(0)
    return recon, l0, fired


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


def fold_scaling(sae: SAE, scale: float) -> SAE:
    """The SAE for raw activations of one trained on `x / scale` with the pre-encoder bias (RECIPE 2,
    folding): b_enc' = C·(b_enc − b_dec @ W_enc), b_dec' = C·b_dec, θ' = C·θ, W_enc and W_dec
    unchanged. On raw x it gives the training-time latents and reconstruction times C."""
    cfg = SAEConfig(**sae.cfg.to_dict())
    folded = build_sae(cfg)
    with torch.no_grad():
        folded.W_enc.copy_(sae.W_enc)
        folded.W_dec.copy_(sae.W_dec)
        folded.b_enc.copy_(scale * (sae.b_enc - sae.b_dec @ sae.W_enc))
        folded.b_dec.copy_(scale * sae.b_dec)
        if isinstance(sae, (JumpReLUSAE, BatchTopKSAE)):
            folded.threshold.copy_(scale * sae.threshold)  # type: ignore[operator]
    return folded


def lr_at(step_index: int, lr: float, warmup_steps: int) -> float:
    """Cosine warm-up from 0.1·lr to lr over the first `warmup_steps` steps, then lr (RECIPE 2)."""
    if step_index >= warmup_steps:
        return lr
    progress = step_index / warmup_steps
    return lr * (LR_WARMUP_START + (1 - LR_WARMUP_START) * 0.5 * (1 - math.cos(math.pi * progress)))


def sparsity_coeff_at(step_index: int, coeff: float, warmup_steps: int) -> float:
    """Linear warm-up of the sparsity coefficient from 0 to `coeff` over `warmup_steps` (RECIPE 2)."""
    if step_index >= warmup_steps:
        return coeff
    return coeff * step_index / warmup_steps


def remove_parallel_grad(W_dec: torch.nn.Parameter) -> None:
    """Remove from each row's gradient its component along that (unit-norm) row, before the
    optimiser step (RECIPE 2, decoder)."""
    if W_dec.grad is not None:
        with torch.no_grad():  # outside no_grad the gradient would grow an autograd graph each step
            W_dec.grad -= (W_dec.grad * W_dec).sum(-1, keepdim=True) * W_dec


# ---------------------------------------------------------------------------------------------
# One SAE being trained


@dataclass
class _Trainee:
    """An SAE in training with its optimiser and the running counts its logs and folder name need."""

    spec: TrainSpec
    site: Site
    scale: float
    sae: SAE
    optimizer: torch.optim.Adam
    lr: float
    since_fired: Tensor  # [d_sae] int64 tokens since the latent last fired
    final: dict[str, Any] = field(default_factory=dict)  # sums over the final part of training

    def state(self) -> dict[str, Any]:
        return {
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "since_fired": self.since_fired,
            "final": self.final,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        device = self.sae.W_enc.device  # a checkpoint saved on another GPU loads onto ours
        self.since_fired = state["since_fired"].to(device)
        self.final = {**state["final"], "fires": state["final"]["fires"].to(device)}


TermsFn = Callable[[JumpReLUSAE, Tensor, float], tuple[Tensor, Tensor, Tensor]]


def _loss(t: _Trainee, x: Tensor, coeff_scale: float, cfg: TrainConfig, terms: TermsFn) -> dict[str, Tensor]:
    """The loss of one SAE on a batch `x [batch, d_in]` (already / C), and what the log reports."""
    spec, sae = t.spec, t.sae
    sparsity: Tensor | float
    if isinstance(sae, JumpReLUSAE):
        recon, l0, fired = terms(sae, x, cfg.bandwidth)
        if spec.target_l0 is not None:  # Gemma Scope 2: quadratic penalty around L0*
            sparsity = cfg.target_l0_coeff * (l0 / spec.target_l0 - 1).pow(2)
        else:
            sparsity = float(spec.l0_coeff or 0.0) * l0
    else:
        pre_acts = sae.pre_acts(x - sae.b_dec)
        if isinstance(sae, BatchTopKSAE):
            f = sae.batch_activation(pre_acts)
            with torch.no_grad():  # the global inference threshold: running mean of the smallest kept value
                kept = f[f > 0]
                if kept.numel():
                    smallest = kept.min()
                    m = BATCHTOPK_THRESHOLD_MOMENTUM if sae.threshold > 0 else 0.0
                    sae.threshold.copy_(m * sae.threshold + (1 - m) * smallest)
        else:
            f = sae.activation(pre_acts)
        recon = (x - sae.decode(f)).pow(2).sum(-1).mean()
        active = f > 0
        l0 = active.sum(-1).float().mean()
        fired = active.any(0)
        # ReLU: L1 on f (decoder rows are unit norm, so this is Anthropic's f·‖W_dec‖ penalty too)
        sparsity = float(spec.l0_coeff or 0.0) * f.sum(-1).mean() if spec.architecture == "relu" else 0.0
    loss = recon + coeff_scale * sparsity
    return {"loss": loss, "recon": recon.detach(), "l0": l0.detach(), "fired": fired}


def _optimizer_step(
    t: _Trainee, loss: Tensor, lr: float, reduce_grads: Callable[[SAE], None] | None = None
) -> None:
    """Backward, (data-parallel: gradients averaged over ranks), decoder-gradient projection, Adam
    step, unit-norm rows, θ > 0."""
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if reduce_grads is not None:
        reduce_grads(t.sae)
    remove_parallel_grad(t.sae.W_dec)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    t.optimizer.step()
    with torch.no_grad():
        t.sae.W_dec.div_(t.sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        if isinstance(t.sae, JumpReLUSAE):
            t.sae.threshold.clamp_(min=THRESHOLD_FLOOR)


# ---------------------------------------------------------------------------------------------
# Training


def train_saes(
    run_dir: Path | str,
    specs: list[TrainSpec],
    tokens: int,
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
    restart: bool = False,
) -> list[Path]:
    """Train every SAE of `specs` for `tokens` activations from one pass over the run's activation
    store, and save each (scaling folded in) to `saes/SITE/layer_L/width_W/l0_K/`, named by the L0
    measured over the last 10% of training. Returns the SAE folders, in the order of `specs`.

    Each step reads one batch of all the specs' sites at the same token positions and steps every
    SAE on it. A checkpoint is written every `config.checkpoint_every` steps; run the same call again
    after a crash or kill and it resumes from it and ends with bit-for-bit the weights of an
    uninterrupted run. A finished run called again returns its folders without training. An
    unfinished checkpoint of another config is an error unless `restart` discards it. A finished
    SAE folder is never overwritten."""
    cfg = config or TrainConfig()
    run_dir = Path(run_dir)
    store = ActivationStore(run_dir)
    specs = [_checked_spec(spec, store) for spec in specs]
    plan = _plan(store, specs, tokens, cfg)
    if cfg.lr is None:
        long_run = plan["steps"] > SHORT_RUN["long_run_steps"]
        cfg = dataclasses.replace(cfg, lr=SHORT_RUN["lr_long"] if long_run else SHORT_RUN["lr"])
    par = _Parallel.start(cfg, specs, store)  # one process unless torchrun started several
    terms = par.share_terms(_terms_fn(cfg.fast))
    key = par.key(_run_key(store, specs, tokens, cfg))
    ckpt = _Checkpoint(run_dir / "checkpoints" / (cfg.name + par.suffix), key)
    done = ckpt.finished_outputs()
    if done is not None:
        return par.finish(done, len(specs))
    resumed = ckpt.load(restart)

    trainees = [_new_trainee(i, specs[i], store, cfg, par.device) for i in par.mine]
    start = 0
    if resumed is not None:
        start = int(resumed["step"])
        for t, state in zip(trainees, resumed["trainees"], strict=True):
            t.load_state(state)
        torch.set_rng_state(resumed["torch_rng"])
    log = _Log(run_dir / "report" / f"{cfg.name}{par.suffix}_log.jsonl", resume_after=start, write=par.writes)

    sites = sorted({t.site for t in trainees})
    n_steps, final_from = plan["steps"], plan["steps"] - plan["final_steps"]
    steps_done = start
    batches = par.batches(store, sites, cfg, plan["epochs"], n_steps)
    bar = tqdm(
        total=n_steps,
        initial=start,
        unit="step",
        desc=f"train {len(trainees)} SAEs",
        disable=not progress or par.rank != 0,
    )
    with bar:
        for step_index, batch in zip(range(n_steps if start < n_steps else 0), batches, strict=False):
            if step_index < start:
                continue  # consumed before the checkpoint; the reader is deterministic for the seed
            row: dict[str, Any] = {"step": step_index + 1, "tokens": (step_index + 1) * cfg.batch_size}
            for t in trainees:
                x = batch[t.site].to(par.device)  # [batch, d_in], already divided by C
                _check_batch(x, t, step_index, store)
                if cfg.max_norm is not None:
                    x = x[x.norm(dim=-1) <= cfg.max_norm]  # [batch', d_in]: massive activations left out
                lr = lr_at(step_index, t.lr, plan["lr_warmup_steps"])
                coeff_scale = sparsity_coeff_at(step_index, 1.0, plan["l0_warmup_steps"])
                out = par.share_out(_loss(t, x, coeff_scale, cfg, terms))
                if not torch.isfinite(out["loss"]):
                    raise ConfigError(
                        f"training of {t.spec.name} diverged at step {step_index + 1} (loss {float(out['loss'])}); "
                        f"lower the learning rate (now {t.lr:g})"
                    )
                _optimizer_step(t, out["loss"], lr, par.reduce_grads if par.data else None)
                stats = _update_counts(t, x, out, step_index >= final_from, plan["dead_window_tokens"], par)
                row[t.spec.name] = {**stats, "lr": lr, "coeff_scale": coeff_scale}
            if (step_index + 1) % cfg.log_every == 0 or step_index + 1 == n_steps:
                log.write(row)
            bar.set_postfix_str(_postfix(row, trainees))
            bar.update(1)
            steps_done = step_index + 1
            if (steps_done % cfg.checkpoint_every == 0 or steps_done == n_steps) and par.writes:
                ckpt.save(steps_done, trainees)
    if steps_done < n_steps:
        raise StoreError(
            f"the activation store gave {steps_done} batches of {cfg.batch_size}, fewer than the {n_steps} planned"
        )
    log.close()
    outputs: list[Path] = []
    if par.writes:
        outputs = [_save_finished(t, run_dir, store, tokens, cfg, plan, key) for t in trainees]
        ckpt.finish(outputs)
        plot_training_log(log.path, run_dir / "report" / f"{cfg.name}{par.suffix}_curves.png")
    return par.finish(outputs, len(specs))


def _checked_spec(spec: TrainSpec, store: ActivationStore) -> TrainSpec:
    """The spec with its site in canonical form, or a ConfigError naming what makes no sense."""
    site = str(parse_site(spec.site))
    if parse_site(site) not in store.sites:
        raise ConfigError(
            f"site {spec.site!r} is not in the activation store of {str(store.run_dir)!r}: "
            f"it holds {', '.join(map(str, store.sites))}"
        )
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
    return TrainSpec(**{**asdict(spec), "site": site})


def _plan(store: ActivationStore, specs: list[TrainSpec], tokens: int, cfg: TrainConfig) -> dict[str, Any]:
    """Steps, epochs and the warm-ups and dead window scaled to this run's length."""
    if not specs:
        raise ConfigError("nothing to train: give at least one SAE spec")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"the same SAE is asked for twice: {sorted({n for n in names if names.count(n) > 1})}"
        )
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
    if tokens < cfg.batch_size:
        raise ConfigError(f"tokens {tokens} must be at least one batch ({cfg.batch_size})")
    steps = tokens // cfg.batch_size
    sites = sorted({parse_site(s.site) for s in specs})
    available = min(int(store.manifest(s)["n_tokens_non_special"]) for s in sites)
    per_epoch = available // cfg.batch_size
    if per_epoch < 1:
        raise StoreError(
            f"the activation store holds {available} usable tokens, less than one batch ({cfg.batch_size})"
        )
    lr_warmup = cfg.lr_warmup_steps
    if lr_warmup is None:
        lr_warmup = min(PUBLISHED["lr_warmup_steps"], round(SHORT_RUN["lr_warmup_fraction"] * steps))
    l0_warmup = cfg.l0_warmup_steps
    if l0_warmup is None:
        l0_warmup = min(PUBLISHED["l0_warmup_steps"], round(SHORT_RUN["l0_warmup_fraction"] * steps))
    dead_window = cfg.dead_window_tokens
    if dead_window is None:
        dead_window = min(
            PUBLISHED["dead_window_tokens"],
            max(cfg.batch_size, round(SHORT_RUN["dead_window_fraction"] * tokens)),
        )
    if lr_warmup < 0 or l0_warmup < 0 or dead_window < 1:
        raise ConfigError(
            f"warm-ups must be >= 0 steps and the dead window >= 1 token, got {lr_warmup}, {l0_warmup}, {dead_window}"
        )
    return {
        "steps": steps,
        "epochs": math.ceil(steps / per_epoch),
        "store_tokens": available,
        "lr_warmup_steps": lr_warmup,
        "l0_warmup_steps": l0_warmup,
        "dead_window_tokens": dead_window,
        "final_steps": max(1, round(FINAL_FRACTION * steps)),
    }


def _terms_fn(fast: bool) -> TermsFn:
    if not fast:
        return jumprelu_terms
    try:
        from gemmascope.sparse_step import jumprelu_terms_sparse
    except ImportError as err:
        raise ConfigError(
            f"fast training needs gemmascope.sparse_step, which cannot be imported: {err}"
        ) from err
    fn: TermsFn = jumprelu_terms_sparse
    return fn


def _new_trainee(
    index: int, spec: TrainSpec, store: ActivationStore, cfg: TrainConfig, device: torch.device | None = None
) -> _Trainee:
    site = parse_site(spec.site)
    manifest = store.manifest(site)
    sae_cfg = SAEConfig(
        architecture=spec.architecture,
        d_in=int(manifest["d_in"]),
        d_sae=spec.width,
        k=spec.k,
        model_name=store.model_name,
        site=str(site),
        hook_name=site.hook_name,
        context_size=store.context_len,
        dataset=store.corpus,
    )
    # Each SAE's init depends only on (seed, its index), so adding SAEs never changes the others.
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    sae = init_sae(build_sae(sae_cfg), generator, cfg.threshold_init).to(device or "cpu")
    lr = spec.lr if spec.lr is not None else cfg.lr
    assert lr is not None, "train_saes resolves the run's learning rate first"
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    return _Trainee(
        spec=spec,
        site=site,
        scale=store.scale(site),
        sae=sae,
        optimizer=optimizer,
        lr=lr,
        since_fired=torch.zeros(spec.width, dtype=torch.long, device=sae.W_enc.device),
        final={
            "steps": 0,
            "tokens": 0,
            "l0": 0.0,
            "sq_err": 0.0,
            "sq_dev": 0.0,
            "fires": torch.zeros(spec.width, device=sae.W_enc.device),
        },
    )


def _check_batch(x: Tensor, t: _Trainee, step_index: int, store: ActivationStore) -> None:
    if x.shape[-1] != t.sae.d_in:
        raise StoreError(f"activations of {t.site} have d_in {x.shape[-1]}, the SAE expects {t.sae.d_in}")
    if not torch.isfinite(x).all():
        raise StoreError(
            f"activations of {t.site} in {str(store.root)!r} contain NaN or inf (batch {step_index + 1}); "
            "the store is damaged or the model overflowed: harvest again (in float32)"
        )


def _update_counts(
    t: _Trainee,
    x: Tensor,
    out: dict[str, Tensor],
    final: bool,
    dead_window: int,
    par: _Parallel | None = None,
) -> dict[str, float]:
    """Dead-latent counts, the final-part sums, and this step's log figures (data-parallel: over
    the whole step's batch, which `x` is this rank's part of)."""
    batch = x.shape[0] if par is None else par.tokens(x.shape[0])
    t.since_fired += batch
    t.since_fired[out["fired"]] = 0
    sq_err = float(out["recon"]) * batch
    sq_dev = float((x - x.mean(0)).pow(2).sum()) if par is None else par.sq_dev(x)
    if final:
        with torch.no_grad():  # densities as the saved SAE fires (BatchTopK: its global threshold)
            fires = (t.sae.activation(t.sae.pre_acts(x - t.sae.b_dec)) > 0).sum(0)
        if par is not None:
            fires = par.sum(fires)
        t.final["steps"] += 1
        t.final["tokens"] += batch
        t.final["l0"] += float(out["l0"])
        t.final["sq_err"] += sq_err
        t.final["sq_dev"] += sq_dev
        t.final["fires"] += fires.float()
    return {
        "loss": float(out["loss"].detach()),
        "recon": float(out["recon"]),
        "l0": float(out["l0"]),
        "fvu": sq_err / sq_dev,
        "dead_fraction": float((t.since_fired >= dead_window).float().mean()),
    }


def _postfix(row: dict[str, Any], trainees: list[_Trainee]) -> str:
    parts = [f"L0 {row[t.spec.name]['l0']:.0f} FVU {row[t.spec.name]['fvu']:.3f}" for t in trainees[:4]]
    return " | ".join(parts) + (" | ..." if len(trainees) > 4 else "")


def _save_finished(
    t: _Trainee,
    run_dir: Path,
    store: ActivationStore,
    tokens: int,
    cfg: TrainConfig,
    plan: dict[str, Any],
    key: str,
) -> Path:
    """Fold the scaling in, name the folder by the measured L0, and save; reuse our own folder if a
    previous attempt of this same run already saved it."""
    fin = t.final
    l0 = fin["l0"] / fin["steps"]
    fvu = fin["sq_err"] / fin["sq_dev"]
    density = fin["fires"].cpu() / fin["tokens"]
    train_id = hashlib.sha256(f"{key}/{t.spec.name}".encode()).hexdigest()[:16]
    trained = t.sae.to_jumprelu() if isinstance(t.sae, BatchTopKSAE) else t.sae
    folded = fold_scaling(trained, t.scale)
    folded.cfg.extra = {
        **trained.cfg.extra,
        "train_id": train_id,
        "l0": l0,
        "fvu": fvu,
        "dead_fraction": float((t.since_fired >= plan["dead_window_tokens"]).float().mean()),
        "measured_on": f"the last {fin['tokens']} training tokens ({FINAL_FRACTION:.0%} of the run)",
        "l0_coeff": t.spec.l0_coeff,
        "target_l0": t.spec.target_l0,
        "target_l0_coeff": cfg.target_l0_coeff if t.spec.target_l0 is not None else None,
        "scale": t.scale,
        "scale_folded": True,
        "tokens": tokens,
        "store_tokens": plan["store_tokens"],
        "epochs": plan["epochs"],
        "steps": plan["steps"],
        "batch_size": cfg.batch_size,
        "lr": t.lr,
        "lr_warmup_steps": plan["lr_warmup_steps"],
        "l0_warmup_steps": plan["l0_warmup_steps"],
        "dead_window_tokens": plan["dead_window_tokens"],
        "bandwidth": cfg.bandwidth,
        "threshold_init": cfg.threshold_init,
        "max_scaled_norm": cfg.max_norm,
        "adam_betas": list(ADAM_BETAS),
        "adam_eps": ADAM_EPS,
        "seed": cfg.seed,
        "fast": cfg.fast,
        "published": {k: list(v) if isinstance(v, tuple) else v for k, v in PUBLISHED.items()},
    }
    base = sae_dir(run_dir, t.site, t.spec.width, l0, architecture=t.spec.architecture)
    for attempt in range(1, 1000):
        folder = base if attempt == 1 else base.with_name(f"{base.name}_v{attempt}")
        if not folder.exists():
            return save_sae(folded, folder, log10_density=torch.log10(density + 1e-10))
        with contextlib.suppress(GemmaScopeError):
            if load_sae(folder).cfg.extra.get("train_id") == train_id:
                return folder  # saved by an earlier attempt of this run, which died before finishing
    raise StoreError(f"too many SAEs named like {str(base)!r}")


def _run_key(store: ActivationStore, specs: list[TrainSpec], tokens: int, cfg: TrainConfig) -> str:
    """What makes two runs the same run: the store's data, the specs, the tokens and every setting
    that changes the numbers (not how often we log or checkpoint)."""
    settings = {
        f.name: getattr(cfg, f.name)
        for f in fields(cfg)
        if f.name not in ("checkpoint_every", "log_every", "name", "parallel", "device")
    }
    data = {s: [e["sha256"] for e in store.manifest(s)["shards"]] for s in sorted({t.site for t in specs})}
    return json.dumps(
        {"specs": [asdict(s) for s in specs], "tokens": tokens, "config": settings, "data": data},
        sort_keys=True,
    )


class _Checkpoint:
    """`run_dir/checkpoints/NAME/`: `state.pt` (weights, optimiser states, counts, step, RNG) while
    training, written atomically; `done.json` (the run key and its SAE folders) once finished."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder = folder
        self.key = key
        self.state_path = folder / "state.pt"
        self.done_path = folder / "done.json"

    def finished_outputs(self) -> list[Path] | None:
        """The SAE folders of this very run if it already finished and they are all still there."""
        if not self.done_path.exists():
            return None
        done = json.loads(self.done_path.read_text())
        outputs = [Path(p) for p in done["outputs"]]
        if done["key"] == self.key and all((p / "cfg.json").exists() for p in outputs):
            return outputs
        return None

    def load(self, restart: bool) -> dict[str, Any] | None:
        if not self.state_path.exists():
            return None
        try:
            state: dict[str, Any] = torch.load(self.state_path, weights_only=False)
        except Exception as err:  # a torn file cannot happen (atomic writes), but a foreign one can
            raise StoreError(f"cannot read checkpoint {str(self.state_path)!r}: {err}") from err
        if state.get("key") == self.key:
            return state
        if restart:
            self.state_path.unlink()
            return None
        raise StoreError(
            f"{str(self.state_path)!r} is an unfinished training run (step {state.get('step')}) of another "
            f"config ({_key_difference(state.get('key'), self.key)}); re-run with its arguments to resume it, "
            "restart to discard it, or choose another name"
        )

    def save(self, step_index: int, trainees: list[_Trainee]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {
            "key": self.key,
            "step": step_index,
            "trainees": [t.state() for t in trainees],
            "torch_rng": torch.get_rng_state(),
        }
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)

    def finish(self, outputs: list[Path]) -> None:
        tmp = self.done_path.with_name(self.done_path.name + ".tmp")
        tmp.write_text(json.dumps({"key": self.key, "outputs": [str(p) for p in outputs]}, indent=1))
        os.replace(tmp, self.done_path)
        self.state_path.unlink(missing_ok=True)


def _key_difference(old: str | None, new: str) -> str:
    """Which parts of two run keys differ, for the error message."""
    try:
        a, b = json.loads(old or "{}"), json.loads(new)
    except json.JSONDecodeError:
        return "unreadable key"
    diffs = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if "config" in diffs:
        ca, cb = a.get("config", {}), b.get("config", {})
        diffs.remove("config")
        diffs += [
            f"{k}: {ca.get(k)!r} -> {cb.get(k)!r}"
            for k in sorted(set(ca) | set(cb))
            if ca.get(k) != cb.get(k)
        ]
    return "differs in " + ", ".join(diffs)


class _Log:
    """The training log, one JSON object per logged step; a resumed run drops rows after its checkpoint."""

    def __init__(self, path: Path, resume_after: int, write: bool = True) -> None:
        self.path = path
        self.file: Any = None
        if not write:  # a data-parallel rank other than 0: rank 0 logs the shared steps
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_after and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_after
            ]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")  # noqa: SIM115 - closed by close()

    def write(self, row: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_training_log(path: Path | str) -> Iterator[dict[str, Any]]:
    """The rows of a training log (`report/NAME_log.jsonl`)."""
    for line in Path(path).read_text().splitlines():
        if line:
            yield json.loads(line)


def plot_training_log(log_path: Path | str, png_path: Path | str) -> Path:
    """Plot loss, L0, FVU and dead fraction against tokens for every SAE of a training log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(read_training_log(log_path))
    names = [k for k in (rows[0] if rows else {}) if k not in ("step", "tokens")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [
        ("loss", "loss", "log"),
        ("l0", "L0", "log"),
        ("fvu", "FVU", "linear"),
        ("dead_fraction", "dead fraction", "linear"),
    ]
    for ax, (metric, label, yscale) in zip(axes.flat, panels, strict=True):
        for name in names:
            ax.plot([r["tokens"] for r in rows], [r[name][metric] for r in rows], label=name)
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        ax.set_yscale(yscale)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


# ---------------------------------------------------------------------------------------------
# Several processes: torchrun, data-parallel and SAE-parallel (ARCHITECTURE.md, Scale)

PARALLEL_MODES = ("data", "sae")


class _Parallel:
    """This process's share of a training run that `torchrun` started in several processes (on one
    machine or several), through torch.distributed: gloo for training on CPU, NCCL on CUDA.

    `data`: every rank holds every SAE and reads its own slice of the store (its shards, see
    `ActivationStore.batches`) at `batch_size / world_size` tokens a step. Loss values, gradients
    and the logged counts are averaged or summed over the ranks, so each step is the single-process
    step on the ranks' batches concatenated in rank order (equal within fp32 rounding). Rank 0 writes
    the log, checkpoints and SAEs; every rank reads the run folder (one filesystem all nodes see).
    `sae`: the SAEs are spread over the ranks, balanced by d_in x width; each rank reads the whole
    stream exactly as one process would, trains its SAEs with its own checkpoint and log (`NAME` +
    `.rankRofW`) and saves them; the only collective is the final exchange of folders.
    One process (no torchrun, or a world of 1): nothing is shared and nothing changes."""

    def __init__(self, mode: str, rank: int, world: int, device: torch.device) -> None:
        self.mode, self.rank, self.world, self.device = mode, rank, world, device
        self.data = mode == "data" and world > 1  # ranks split each batch
        self.spread = mode == "sae" and world > 1  # ranks split the SAEs
        self.mine: list[int] = []
        self.owns_group = False  # whether `start` joined the process group (and `finish` leaves it)

    @classmethod
    def start(cls, cfg: TrainConfig, specs: list[TrainSpec], store: ActivationStore) -> _Parallel:
        """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR...) unless the
        caller already did, and check that the run can be shared in `cfg.parallel` mode."""
        import torch.distributed as dist

        if cfg.parallel not in PARALLEL_MODES:
            raise ConfigError(f"unknown parallel mode {cfg.parallel!r}: expected one of {PARALLEL_MODES}")
        device = _training_device(cfg.device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        started = dist.is_available() and dist.is_initialized()
        if started:
            world = dist.get_world_size()
        elif world > 1:
            if not dist.is_available():
                raise ConfigError(f"WORLD_SIZE is {world} but this PyTorch has no torch.distributed")
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            atexit.register(dist.destroy_process_group)  # if the run fails before `finish`
        par = cls(cfg.parallel, dist.get_rank() if world > 1 else 0, world, device)
        par.owns_group = world > 1 and not started
        if par.data:
            if cfg.batch_size % world:
                raise ConfigError(
                    f"data-parallel training splits each batch over {world} processes: batch size "
                    f"{cfg.batch_size} must be a multiple of {world}"
                )
            batchtopk = [s.name for s in specs if s.architecture == "batchtopk"]
            if batchtopk:
                raise ConfigError(
                    f"BatchTopK ranks the whole batch, which data-parallel training splits ({batchtopk[0]}); "
                    "train it with parallel='sae' or in one process"
                )
        parts = _spread(specs, store, world) if par.spread else [list(range(len(specs)))]
        if any(not part for part in parts):
            raise ConfigError(
                f"SAE-parallel training of {len(specs)} SAEs over {world} processes leaves some idle"
            )
        par.mine = parts[par.rank if par.spread else 0]
        return par

    @property
    def writes(self) -> bool:
        """Whether this process writes checkpoints, logs and SAEs (data-parallel: rank 0 only)."""
        return not self.data or self.rank == 0

    @property
    def suffix(self) -> str:
        """What tells this rank's checkpoint and log apart in SAE-parallel mode."""
        return f".rank{self.rank}of{self.world}" if self.spread else ""

    def key(self, key: str) -> str:
        """The run key with how the run is shared: a resumed run must be shared the same way."""
        if self.world == 1:
            return key
        return json.dumps(
            {**json.loads(key), "parallel": self.mode, "world_size": self.world}, sort_keys=True
        )

    def batches(
        self, store: ActivationStore, sites: list[Site], cfg: TrainConfig, epochs: int, steps: int
    ) -> Iterator[dict[Site, Tensor]]:
        """This rank's batches. Data-parallel ranks read only their own shards, so an epoch gives as
        many batches as the smallest slice allows: allow up to one epoch per step (the reader is
        lazy; the planned steps still end the run)."""
        return store.batches(
            sites,
            cfg.batch_size // self.world if self.data else cfg.batch_size,
            seed=cfg.seed,
            buffer_tokens=cfg.buffer_tokens,
            epochs=max(epochs, steps) if self.data else epochs,
            rank=self.rank if self.data else 0,
            world_size=self.world if self.data else 1,
            scaled=True,
        )

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor)  # sum
        return tensor

    def _shared_value(self, value: Tensor) -> Tensor:
        """`value` with the mean over ranks as its value and this rank's gradient (averaged later
        with the others' by `reduce_grads`, which makes it the gradient of the mean)."""
        mean = self._all_reduce(value.detach().clone()) / self.world
        return value + (mean - value).detach()

    def share_terms(self, terms: TermsFn) -> TermsFn:
        """JumpReLU terms whose L0 is the whole batch's (the target-L0 penalty is not linear in it)."""
        if not self.data:
            return terms

        def shared(sae: JumpReLUSAE, x: Tensor, bandwidth: float) -> tuple[Tensor, Tensor, Tensor]:
            recon, l0, fired = terms(sae, x, bandwidth)
            return recon, self._shared_value(l0), fired

        return shared

    def share_out(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """A step's loss (value of the whole batch, gradient of this rank's part), recon, l0 and
        fired over the whole batch."""
        if not self.data:
            return out
        fired = self._all_reduce(out["fired"].to(torch.int32)) > 0
        return {
            "loss": self._shared_value(out["loss"]),
            "recon": self._shared_value(out["recon"]).detach(),
            "l0": self._shared_value(out["l0"].float()).detach(),
            "fired": fired,
        }

    def reduce_grads(self, sae: SAE) -> None:
        """Average every parameter's gradient over the ranks (before the decoder projection and Adam)."""
        for p in sae.parameters():
            if p.grad is None:  # every rank must take part in every all-reduce
                p.grad = torch.zeros_like(p)
            self._all_reduce(p.grad).div_(self.world)

    def tokens(self, local: int) -> int:
        """Tokens in the whole step's batch."""
        return local * self.world if self.data else local

    def sq_dev(self, x: Tensor) -> float:
        """Σ ‖x − mean(x)‖² over the whole step's batch `x [batch, d_in]`."""
        if not self.data:
            return float((x - x.mean(0)).pow(2).sum())
        x64 = x.double()
        sums = self._all_reduce(torch.cat([x64.sum(0), x64.pow(2).sum().view(1)]))
        n = x.shape[0] * self.world
        return float(sums[-1] - sums[:-1].pow(2).sum() / n)

    def sum(self, tensor: Tensor) -> Tensor:
        """`tensor` summed over the ranks that split the batch."""
        return self._all_reduce(tensor.float()) if self.data else tensor

    def finish(self, outputs: list[Path], n_specs: int) -> list[Path]:
        """Every SAE folder of the run, in the order of the specs, on every rank; then leave the
        process group if `start` joined it."""
        if self.world == 1:
            return outputs
        import torch.distributed as dist

        if self.data:
            shared: list[Any] = [outputs]
            dist.broadcast_object_list(shared, src=0)
            folders = [Path(p) for p in shared[0]]
        else:
            parts: list[Any] = [None] * self.world
            dist.all_gather_object(parts, (self.mine, [str(p) for p in outputs]))
            by_spec: list[Path | None] = [None] * n_specs
            for indices, paths in parts:
                for i, p in zip(indices, paths, strict=True):
                    by_spec[i] = Path(p)
            folders = [p for p in by_spec if p is not None]
        if self.owns_group:
            # Leave together: a rank tearing down its group while another still talks to it can
            # abort that one at exit ("terminate called without an active exception").
            dist.barrier()
            dist.destroy_process_group()
            atexit.unregister(dist.destroy_process_group)
            self.owns_group = False
        return folders


def _spread(specs: list[TrainSpec], store: ActivationStore, world: int) -> list[list[int]]:
    """Spec indices per rank, balancing d_in x width (the cost of a step), largest first."""
    cost = [int(store.manifest(parse_site(s.site))["d_in"]) * s.width for s in specs]
    loads, parts = [0] * world, [[] for _ in range(world)]  # type: list[int], list[list[int]]
    for i in sorted(range(len(specs)), key=lambda i: (-cost[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        parts[rank].append(i)
        loads[rank] += cost[i]
    return [sorted(part) for part in parts]


def _training_device(name: str) -> torch.device:
    """The device SAEs train on; plain "cuda" under torchrun is this process's GPU (LOCAL_RANK)."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {name!r}: expected cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device
