"""The end of an SAE's training: the saved form (its architecture's, `Architecture.as_saved`) with the
input scaling folded in (`fold_scaling`, RECIPE.md section 2, "Folding"), every value the run used and
the published ones recorded in `cfg.extra`, the folder named by the L0 measured on held-out tokens
(`runs.sae_dir`), and a finished folder never overwritten.

Knows nothing of the step loop or checkpoints (see `loop`, `checkpoint`).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gemmascope.errors import GemmaScopeError
from gemmascope.formats import load_sae, save_sae
from gemmascope.runs import free_folder, sae_dir
from gemmascope.sae import SAE, SAEConfig, architecture, build_sae
from gemmascope.train.config import Plan
from gemmascope.train.optim import fixed_biases
from gemmascope.train.recipe import ADAM_EPS, FINAL_FRACTION, PUBLISHED
from gemmascope.train.trainee import Trainee


def fold_scaling(sae: SAE, scale: float, out_scale: float | None = None) -> SAE:
    """The SAE for raw activations of one trained on `x / scale` with the pre-encoder bias (RECIPE 2,
    folding): b_enc' = C·(b_enc − bias @ W_enc) with bias `b_dec` (a transcoder: `b_in`, then 0),
    b_dec' = C·b_dec, W_enc and W_dec unchanged, and what the architecture keeps in the
    pre-activations' units times C (`Architecture.input_scaled`: θ' = C·θ). On raw x it gives the
    training-time latents and reconstruction times C. A transcoder trained to predict `y / out_scale`
    has W_dec' and W_skip' times out_scale / scale and b_dec' = out_scale·b_dec: on raw x it predicts
    raw y."""
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
        for name in architecture(sae.cfg.architecture).input_scaled:
            getattr(folded, name).copy_(scale * getattr(sae, name))
    return folded


def save_trained(t: Trainee, run_dir: Path, plan: Plan, key: str, heldout: dict[str, Any] | None) -> Path:
    """Fold the scaling in, name the folder by the L0 measured on held-out tokens (on the last 10% of
    training when the run has none), and save; reuse our own folder if a previous attempt of this
    same run already saved it."""
    figures = _figures(t, heldout)
    train_id = hashlib.sha256(f"{key}/{t.spec.name}".encode()).hexdigest()[:16]
    trained = t.arch.as_saved(t.sae)
    folded = fold_scaling(trained, t.scale, t.out_scale)
    folded.cfg.extra = {**trained.cfg.extra, **_record(t, plan, train_id, figures)}
    max_norm = plan.config.max_norm
    folded.cfg.max_norm = max_norm * t.scale if max_norm is not None else None  # raw inputs
    base = sae_dir(run_dir, t.site, t.spec.width, figures["l0"], kind=t.spec.folder_kind)
    log10_density = torch.log10(figures["density"] + 1e-10)
    folder, ours = free_folder(base, lambda f: _train_id(f) == train_id)
    if ours:
        return folder  # saved by an earlier attempt of this run, which died before finishing
    return save_sae(folded, folder, log10_density=log10_density)


def _train_id(folder: Path) -> str | None:
    """The `train_id` an SAE folder records, if it is a readable SAE."""
    with contextlib.suppress(GemmaScopeError):
        value = load_sae(folder).cfg.extra.get("train_id")
        return value if isinstance(value, str) else None
    return None


def _figures(t: Trainee, heldout: dict[str, Any] | None) -> dict[str, Any]:
    """L0, FVU, per-latent density [d_sae] and what they were measured on: the held-out tokens when
    the run has them, else the last part of training."""
    fin = t.final
    # a spike recovered from in the last steps can leave the final part empty (its sums went back)
    density: Tensor = fin["fires"].cpu() / max(fin["tokens"], 1)
    measured_on = f"the last {fin['tokens']} training tokens ({FINAL_FRACTION:.0%} of the run)"
    if t.sae.cfg.extra.get("decoder_refit_tokens"):
        measured_on += ", before the decoder refit"
    if t.spec.matryoshka:
        measured_on += " (FVU: the mean over the Matryoshka prefixes)"
    figures = {
        "l0": fin["l0"] / max(fin["steps"], 1),
        "fvu": fin["sq_err"] / max(fin["sq_dev"], 1e-12),
        "density": density,
        "measured_on": measured_on,
    }
    if heldout is not None:
        figures = {k: heldout[k] for k in ("l0", "fvu", "density")}
        figures["measured_on"] = f"{heldout['tokens']} held-out tokens"
    return figures


def _record(t: Trainee, plan: Plan, train_id: str, figures: dict[str, Any]) -> dict[str, Any]:
    """What `cfg.extra` keeps of a trained SAE: its figures and every value the run used, beside the
    published ones (the keys every saved SAE has had; old folders load with them)."""
    cfg, spec = plan.config, t.spec
    signum = cfg.optimizer == "signum"
    assert cfg.dead_window_tokens is not None, "config.resolve sets the dead window"
    return {
        "train_id": train_id,
        "l0": figures["l0"],
        "fvu": figures["fvu"],
        "dead_fraction": float((t.since_fired >= cfg.dead_window_tokens).float().mean()),
        "measured_on": figures["measured_on"],
        "l0_coeff": spec.l0_coeff,
        "target_l0": spec.target_l0,
        "target_l0_coeff": cfg.target_l0_coeff if spec.target_l0 is not None else None,
        "scale": t.scale,
        "out_scale": t.out_scale if t.out_site is not None else None,
        "scale_folded": True,
        "tokens": plan.tokens,
        "store_tokens": plan.store_tokens,
        "epochs": plan.epochs,
        "steps": plan.steps,
        "batch_size": cfg.batch_size,
        "lr": spec.lr,  # as asked; lr_final after any recoveries
        "lr_final": t.lr,
        "spike_recoveries": t.recoveries,
        "lr_warmup_steps": cfg.lr_warmup_steps,
        "lr_decay_steps": cfg.lr_decay_steps,
        "l0_warmup_steps": cfg.l0_warmup_steps,
        "dead_window_tokens": cfg.dead_window_tokens,
        "bandwidth": cfg.bandwidth,
        "b_dec_init": cfg.b_dec_init,
        "threshold_init": cfg.threshold_init if cfg.threshold_init is not None else "target firing rate",
        "dead_preact_coeff": cfg.dead_preact_coeff,
        "dense_coeff": cfg.dense_coeff,
        "dense_density": cfg.dense_density,
        "auxk_coeff": cfg.auxk_coeff,
        "max_scaled_norm": cfg.max_norm,
        "optimizer": cfg.optimizer,
        "threshold_lr_ratio": cfg.threshold_lr_ratio if signum else 1.0,
        "fixed_biases": signum and fixed_biases(t.sae),
        "adam_betas": list(cfg.adam_betas),
        "adam_eps": ADAM_EPS,
        "seed": cfg.seed,
        "fast": cfg.fast,
        "step_dtype": cfg.step_dtype,
        "matryoshka_prefixes": list(spec.prefixes) if spec.prefixes else None,
        "published": PUBLISHED.to_json(),
    }
