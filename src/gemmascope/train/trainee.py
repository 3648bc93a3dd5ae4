"""One SAE in training (`Trainee`): its optimiser; the running counts that training watches (tokens
since each latent last fired, every latent's firing rate, the batch FVU) and the sums over the final
part of training that its log and folder name need; the spike guard (a batch FVU far above its running
value sends the SAE back to its last good state, kept every 50 steps, with half the learning rate);
and its measurement on held-out activations at the end.

Knows nothing of the step loop, checkpoints on disk or the saved folder (see `loop`, `checkpoint`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from gemmascope.activations import ActivationStore
from gemmascope.errors import TrainingError
from gemmascope.sae import SAE, Architecture, SAEConfig, architecture, build_sae
from gemmascope.sites import Site, parse_site
from gemmascope.sparse_step import latent_major_encoder
from gemmascope.train.config import TrainConfig, TrainSpec
from gemmascope.train.distributed import Parallel
from gemmascope.train.init import init_sae
from gemmascope.train.optim import make_optimizer
from gemmascope.train.recipe import (
    ADAM_EPS,
    DENSITY_MOMENTUM,
    HELDOUT_BATCH,
    HELDOUT_TOKENS,
    MAX_RECOVERIES,
    THRESHOLD_INIT,
)


@dataclass
class Trainee:
    """An SAE in training with its optimiser and the running counts its logs and folder name need."""

    spec: TrainSpec
    site: Site
    scale: float
    out_site: Site | None  # a transcoder's output site (its target), None for an SAE
    out_scale: float  # the output site's C (an SAE's: `scale`)
    sae: SAE
    optimizer: torch.optim.Optimizer
    lr: float
    since_fired: Tensor  # [d_sae] int64 tokens since the latent last fired
    density: Tensor  # [d_sae] running firing rate, measured every DENSITY_EVERY steps
    final: dict[str, Any] = field(default_factory=dict)  # sums over the final part of training
    fvu: float | None = None  # running batch FVU, what the spike guard compares with
    recoveries: int = 0  # spikes recovered from (each halves lr)
    good: dict[str, Any] | None = None  # the state a spike goes back to (`recipe.GOOD_EVERY`)

    @property
    def arch(self) -> Architecture:
        """Its architecture: its loss terms, after-step update and saved form."""
        return architecture(self.spec.architecture)

    @property
    def sites(self) -> list[Site]:
        """The sites this SAE reads: its own, and a transcoder's output site."""
        return [self.site] if self.out_site is None else [self.site, self.out_site]

    def state(self) -> dict[str, Any]:
        return {
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "since_fired": self.since_fired,
            "density": self.density,
            "final": self.final,
            "fvu": self.fvu,
            "lr": self.lr,
            "recoveries": self.recoveries,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        state = copy.deepcopy(state)  # a kept state must not share tensors with the live SAE
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        _lay_out_as_parameters(self.optimizer)
        device = self.sae.W_enc.device  # a checkpoint saved on another GPU loads onto ours
        self.since_fired = state["since_fired"].to(device)
        self.density = state["density"].to(device)
        self.final = {**state["final"], "fires": state["final"]["fires"].to(device)}
        self.fvu, self.lr, self.recoveries = state["fvu"], state["lr"], state["recoveries"]

    def keep_good(self) -> None:
        """Remember the current state as the one a spike goes back to."""
        self.good = copy.deepcopy(self.state())


def _lay_out_as_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Each optimiser state tensor shaped as its parameter laid out as it too: a checkpoint written
    before the trainer stored W_enc latent-major (`sparse_step.latent_major_encoder`) holds contiguous
    states, which would make every later step's elementwise passes transposing ones."""
    for p, entries in optimizer.state.items():
        for key, value in entries.items():
            if isinstance(value, Tensor) and value.shape == p.shape and value.stride() != p.stride():
                entries[key] = torch.empty_like(p).copy_(value)


def new_trainee(
    index: int, spec: TrainSpec, store: ActivationStore, cfg: TrainConfig, device: torch.device | None = None
) -> Trainee:
    """A new SAE to train for `spec` (its `lr` resolved, `config.resolve`) on the store's site, at
    the recipe's initialisation, with its optimiser."""
    site = parse_site(spec.site)
    out_site = None if spec.out_site is None else parse_site(spec.out_site)
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
        out_site="" if out_site is None else str(out_site),
        affine_skip=spec.skip,
    )
    # Each SAE's init depends only on (seed, its index), so adding SAEs never changes the others.
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    threshold = cfg.threshold_init if cfg.threshold_init is not None else THRESHOLD_INIT
    sae = init_sae(build_sae(sae_cfg), generator, threshold).to(device or "cpu")
    if cfg.fast and architecture(spec.architecture).fast_step:
        latent_major_encoder(sae)  # the layout of the sparse step's encoder gradient
    lr = spec.lr if spec.lr is not None else cfg.lr
    assert lr is not None, "config.resolve gives every spec its learning rate"
    optimizer = make_optimizer(sae, cfg.optimizer, lr, lr * cfg.threshold_lr_ratio, cfg.adam_betas, ADAM_EPS)
    return Trainee(
        spec=spec,
        site=site,
        scale=store.scale(site),
        out_site=out_site,
        out_scale=store.scale(out_site or site),
        sae=sae,
        optimizer=optimizer,
        lr=lr,
        since_fired=torch.zeros(spec.width, dtype=torch.long, device=sae.W_enc.device),
        density=torch.full((spec.width,), -1.0, device=sae.W_enc.device),  # -1: not measured yet
        final={
            "steps": 0,
            "tokens": 0,
            "l0": 0.0,
            "sq_err": 0.0,
            "sq_dev": 0.0,
            "fires": torch.zeros(spec.width, device=sae.W_enc.device),
        },
    )


def spiked(t: Trainee, loss: float, fvu: float, cfg: TrainConfig, warm: bool) -> bool:
    """Whether this batch shows a broken SAE: a non-finite loss, or (after the lr warm-up) a batch
    FVU over `cfg.spike_factor` times its running value."""
    if not math.isfinite(loss):
        return True
    return bool(cfg.spike_factor and warm and t.fvu is not None and fvu > cfg.spike_factor * t.fvu)


def recover(t: Trainee, step_index: int, fvu: float) -> None:
    """Go back to the last good state (`keep_good`) with half the learning rate, or stop with a message
    once MAX_RECOVERIES spikes have been recovered from (nothing of this run is saved)."""
    if t.good is None or t.recoveries >= MAX_RECOVERIES:
        raise TrainingError(
            f"training of {t.spec.name} broke down at step {step_index + 1} (batch FVU {fvu:.3g} against a "
            f"running {t.fvu or float('nan'):.3g}) after {t.recoveries} recoveries at ever lower learning "
            f"rates (now {t.lr:g}); nothing was saved: train again with a lower lr"
        )
    lr, recoveries = t.lr, t.recoveries
    t.load_state(t.good)
    t.lr, t.recoveries = lr / 2, recoveries + 1
    tqdm.write(
        f"{t.spec.name}: batch FVU {fvu:.3g} at step {step_index + 1} is a spike; back to the last "
        f"good state with lr {t.lr:g}"
    )


def firing_counts(t: Trainee, x: Tensor, par: Parallel | None = None) -> Tensor:
    """`[d_sae]` float: on how many tokens of `x [batch, d_in]` (already / C; data-parallel: of the
    whole step's batch, `x` this rank's part) each latent fires as the SAE is now (after the step,
    as saved: BatchTopK by its global threshold): one encoder pass, for the final-part densities."""
    with torch.no_grad():
        # summed as float32 (exact: a batch is far under 2^24 tokens), twice as fast as an int64 sum
        fires = t.sae.firing(t.sae.pre_acts(t.sae.centered(x))).sum(0, dtype=torch.float32)
    return fires if par is None else par.sum(fires)


def measure_density(t: Trainee, fires: Tensor, tokens: int) -> None:
    """Update the running firing rate of every latent (what the dense penalty reads) from its
    `fires [d_sae]` over `tokens` (the step's `Terms.fired`: as the SAE fired in its forward)."""
    rate = fires / tokens
    running = DENSITY_MOMENTUM * t.density + (1 - DENSITY_MOMENTUM) * rate
    t.density = torch.where(t.density < 0, rate, running)  # -1: not measured yet


def update_counts(
    t: Trainee,
    x: Tensor,
    out: dict[str, Tensor],
    fires: Tensor | None,
    dead_window: int,
    sq_dev: float,
    par: Parallel | None = None,
) -> dict[str, float]:
    """Dead-latent counts, the final-part sums (`fires [d_sae]`, the step's `firing_counts`, given
    in the final part of training, None elsewhere), and this step's log figures (data-parallel: over
    the whole step's batch, which `x` is this rank's part of; `sq_dev` is its Σ ‖x − mean(x)‖²)."""
    batch = x.shape[0] if par is None else par.tokens(x.shape[0])
    t.since_fired += batch
    t.since_fired[out["fired"] > 0] = 0
    sq_err = float(out["recon"]) * batch
    if fires is not None:  # densities as the saved SAE fires (BatchTopK: its global threshold)
        t.final["steps"] += 1
        t.final["tokens"] += batch
        t.final["l0"] += float(out["l0"])
        t.final["sq_err"] += sq_err
        t.final["sq_dev"] += sq_dev
        t.final["fires"] += fires
    return {
        "loss": float(out["loss"].detach()),
        "recon": float(out["recon"]),
        "l0": float(out["l0"]),
        "fvu": sq_err / sq_dev,
        "dead_fraction": float((t.since_fired >= dead_window).float().mean()),
    }


def measure_heldout(t: Trainee, heldout: ActivationStore | None, cfg: TrainConfig) -> dict[str, Any] | None:
    """L0, FVU and per-latent density of a trained SAE on up to HELDOUT_TOKENS held-out tokens of its
    site (scaled by the training C, massive activations left out as in training), or None when the
    run has no held-out activations of that site. A transcoder's FVU is of its output site."""
    sites = t.sites
    if heldout is None or any(s not in heldout.sites for s in sites):
        return None
    sq_err = sq_dev = l0 = 0.0
    fires = torch.zeros(t.sae.d_sae)
    n = 0
    with torch.no_grad():
        available = min(int(heldout.manifest(s)["n_tokens_non_special"]) for s in sites)
        scales = {t.site: t.scale, **({t.out_site: t.out_scale} if t.out_site is not None else {})}
        for raw in heldout.batches(sites, max(1, min(HELDOUT_BATCH, available)), seed=0):
            batch = {s: raw[s] / scales[s] for s in sites}  # by the training run's C, as in training
            x, target = training_pair(t, batch, t.sae.W_enc.device, cfg.max_norm)
            y = x if target is None else target
            f = t.sae.activation(t.sae.pre_acts(t.sae.centered(x)))  # [batch, d_sae]
            sq_err += float((y - t.sae.decode(f) - t.sae.skip(x)).pow(2).sum())
            sq_dev += float((y - y.mean(0)).pow(2).sum())
            l0 += float((f > 0).sum())
            fires += (f > 0).sum(0).float().cpu()
            n += x.shape[0]
            if n >= HELDOUT_TOKENS:
                break
    if n == 0:
        return None
    return {"l0": l0 / n, "fvu": sq_err / sq_dev, "density": fires / n, "tokens": n}


def training_pair(
    t: Trainee, batch: dict[Site, Tensor], device: torch.device | str, max_norm: float | None
) -> tuple[Tensor, Tensor | None]:
    """`(x, target)` (already / C) on `device`: the SAE's input `[batch', d_in]` and, for a
    transcoder, what it learns to output (its output site's activations, `[batch', d_in]`; None for
    an SAE, which reconstructs `x`), with the tokens whose input is massive (scaled norm over
    `max_norm`) left out, as every use of the SAE leaves them out. A transcoder's large outputs
    stay: at layers 0-1 of Gemma 3 270M the MLP writes outputs over 3x the RMS norm on 5-6% of
    tokens from ordinary inputs, and they carry 60-80% of its output's squared norm."""
    x = batch[t.site].to(device)
    target = None if t.out_site is None else batch[t.out_site].to(device)
    if max_norm is not None:
        keep = x.norm(dim=-1) <= max_norm
        x = x[keep]
        target = None if target is None else target[keep]
    return x, target
