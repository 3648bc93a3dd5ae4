"""The training loop: several SAEs (widths, λs, sites, architectures) from one pass over the activation
store. Each step reads one batch of all the specs' sites at the same token positions and steps every
SAE on it: the loss (with the recipe's terms for dead and dense latents and AuxK), backward, Adam with
the decoder-gradient projection and unit-norm rows, and the spike guard; each SAE starts from the run's
first batch (`recipe.init_from_data`). At the end it re-solves each decoder by least squares with the
codes fixed (`refit`), names each SAE by its L0 on held-out activations
(when the run has them), folds the input scaling in and saves it.

Knows nothing of the model: it reads activations from `activations.ActivationStore` only. The
recipe's numbers and pure functions are `recipe`'s, one SAE's state and counts `trainee`'s,
checkpoints and the log `checkpoint`'s, and processes `distributed`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from gemmascope.activations import ActivationStore
from gemmascope.errors import ConfigError, GemmaScopeError, StoreError
from gemmascope.evals.report import plot_training_log
from gemmascope.formats import load_sae, sae_dir, save_sae
from gemmascope.runs import ACTIVATIONS, CHECKPOINTS, HELDOUT, REPORT
from gemmascope.sae import SAE, BatchTopKSAE, JumpReLUSAE
from gemmascope.sites import Site
from gemmascope.train.checkpoint import Checkpoint, TrainingLog, read_training_log, run_key
from gemmascope.train.distributed import Parallel
from gemmascope.train.optim import averaged, fixed_biases
from gemmascope.train.recipe import (
    ADAM_EPS,
    BATCHTOPK_THRESHOLD_MOMENTUM,
    DENSITY_EVERY,
    FINAL_FRACTION,
    FVU_MOMENTUM,
    INIT_DENSITY,
    INIT_L0,
    PUBLISHED,
    SKIP_FIT_BATCHES,
    THRESHOLD_FLOOR,
    TermsFn,
    TrainConfig,
    TrainSpec,
    auxk_loss,
    checked_spec,
    dead_preact_loss,
    dense_penalty,
    fold_scaling,
    init_from_data,
    jumprelu_terms,
    lr_at,
    matryoshka_prefixes,
    nested_recon,
    remove_parallel_grad,
    run_plan,
    sparsity_coeff_at,
    with_run_defaults,
    with_spec_defaults,
)
from gemmascope.train.refit import refit_decoder
from gemmascope.train.trainee import (
    Trainee,
    measure_density,
    measure_heldout,
    new_trainee,
    recover,
    spiked,
    training_pair,
    update_counts,
)

# ---------------------------------------------------------------------------------------------
# One step of one SAE


def _loss(
    t: Trainee,
    x: Tensor,
    target: Tensor | None,
    coeff_scale: float,
    cfg: TrainConfig,
    terms: TermsFn,
    dead_window: int,
    share: Callable[[Tensor], Tensor] | None = None,
    recon_scale: float = 1.0,
) -> dict[str, Tensor]:
    """The loss of one SAE on a batch `x [batch, d_in]` (already / C) with `target` (None: `x`
    itself; a transcoder's output-site activations), and what the log reports;
    `share` makes a data-parallel rank's batch means the whole batch's where the loss is not linear.
    The reconstruction term enters the loss times `recon_scale` (the sign optimiser: 1 / the batch's
    mean ‖x − mean(x)‖², so that it is the batch FVU, as the penalties' coefficients assume)."""
    spec, sae = t.spec, t.sae
    y = x if target is None else target
    dead = t.since_fired >= dead_window  # [d_sae]
    prefixes = matryoshka_prefixes(spec.width) if spec.matryoshka else None
    sparsity: Tensor | float
    extra: Tensor | float = 0.0
    if isinstance(sae, JumpReLUSAE):
        recon, l0, fired = terms(sae, x, cfg.bandwidth, target, prefixes)
        if spec.target_l0 is not None:  # Gemma Scope 2: quadratic penalty around L0*
            sparsity = cfg.target_l0_coeff * (l0 / spec.target_l0 - 1).pow(2)
        else:
            sparsity = float(spec.l0_coeff or 0.0) * l0
        dense = t.density > cfg.dense_density
        if cfg.dead_preact_coeff and dead.any():
            extra = extra + cfg.dead_preact_coeff * dead_preact_loss(sae, x, dead)
        if cfg.dense_coeff and dense.any():
            penalty = dense_penalty(sae, x, dense, cfg.dense_density, cfg.bandwidth, share)
            extra = extra + cfg.dense_coeff * penalty
    else:
        pre_acts = sae.pre_acts(sae.centered(x))
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
        x_hat = sae.decode(f) + sae.skip(x)
        recon = nested_recon(f, sae.W_dec, y - sae.b_dec - sae.skip(x), prefixes)
        active = f > 0
        l0 = active.sum(-1).float().mean()
        fired = active.any(0)
        # ReLU: L1 on f (decoder rows are unit norm, so this is Anthropic's f·‖W_dec‖ penalty too)
        sparsity = float(spec.l0_coeff or 0.0) * f.sum(-1).mean() if spec.architecture == "relu" else 0.0
        if spec.k is not None and cfg.auxk_coeff and dead.any():
            k_aux = max(1, x.shape[1] // 2)  # sparsify's k_aux: half of d_in
            extra = cfg.auxk_coeff * auxk_loss(sae, x, (y - x_hat).detach(), dead, k_aux)
    loss = recon_scale * recon + coeff_scale * sparsity + extra
    return {"loss": loss, "recon": recon.detach(), "l0": l0.detach(), "fired": fired}


def _optimizer_step(
    t: Trainee, loss: Tensor, lr: float, reduce_grads: Callable[[SAE], None] | None = None
) -> None:
    """Backward, (data-parallel: gradients averaged over ranks), decoder-gradient projection, Adam
    step, unit-norm rows, θ > 0."""
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if reduce_grads is not None:
        reduce_grads(t.sae)
    remove_parallel_grad(t.sae.W_dec)
    for group in t.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
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
    store, and save each (scaling folded in) to `saes/SITE/layer_L/width_W/l0_K/`, named by its L0 on
    the run's held-out activations (`runs.HELDOUT`) when it has them, else by the L0 measured over the
    last 10% of training. Returns the SAE folders, in the order of `specs`.

    Each step reads one batch of all the specs' sites at the same token positions and steps every
    SAE on it. A checkpoint is written every `config.checkpoint_every` steps; run the same call again
    after a crash or kill and it resumes from it and ends with bit-for-bit the weights of an
    uninterrupted run. A finished run called again returns its folders without training. An
    unfinished checkpoint of another config is an error unless `restart` discards it. A finished
    SAE folder is never overwritten."""
    cfg = config or TrainConfig()
    run_dir = Path(run_dir)
    store = ActivationStore(run_dir)
    specs = with_spec_defaults([checked_spec(spec, store) for spec in specs], cfg)
    plan = run_plan(store, specs, tokens, cfg)
    cfg = with_run_defaults(cfg, plan["steps"])
    par = Parallel.start(cfg, specs, store)  # one process unless torchrun started several
    terms = par.share_terms(_terms_fn(cfg.fast))
    key = par.key(run_key(store, specs, tokens, cfg))
    ckpt = Checkpoint(run_dir / CHECKPOINTS / (cfg.name + par.suffix), key)
    done = ckpt.finished_outputs()
    if done is not None:
        return par.finish(done, len(specs))
    resumed = ckpt.load(restart)

    trainees = [new_trainee(i, specs[i], store, cfg, par.device) for i in par.mine]
    start = 0
    if resumed is not None:
        start = int(resumed["step"])
        for t, state in zip(trainees, resumed["trainees"], strict=True):
            t.load_state(state)
        torch.set_rng_state(resumed["torch_rng"])
    log_path = run_dir / REPORT / f"{cfg.name}{par.suffix}_log.jsonl"
    log = TrainingLog(log_path, resume_after=start, write=par.writes)
    sites = sorted({s for t in trainees for s in t.sites})
    batches = par.batches(store, sites, cfg, plan["epochs"], plan["steps"])
    if start == 0:
        # the first batch starts every SAE; a transcoder's skip connection is fitted on a few more
        skips = any(t.sae.W_skip is not None for t in trainees)
        first = list(itertools.islice(batches, SKIP_FIT_BATCHES if skips else 1))
        _init_from_data(trainees, first, cfg, par)
        batches = itertools.chain(first, batches)
    for t in trainees:
        t.keep_good()
    _train_steps(_Run(store, cfg, plan, par, terms), trainees, batches, start, log, ckpt, progress)
    log.close()
    outputs: list[Path] = []
    if par.writes:
        heldout = _heldout_store(run_dir)
        outputs = []
        for t in trainees:
            with averaged(t.optimizer):  # the sign optimiser's average is the SAE it trained
                if cfg.refit_tokens:
                    n = refit_decoder(t, store, cfg, min(tokens, cfg.refit_tokens), progress)
                    t.sae.cfg.extra["decoder_refit_tokens"] = n
                outputs.append(
                    _save_finished(
                        t, run_dir, store, tokens, cfg, plan, key, measure_heldout(t, heldout, cfg)
                    )
                )
        ckpt.finish(outputs)
        plot_training_log(
            read_training_log(log.path), run_dir / REPORT / f"{cfg.name}{par.suffix}_curves.png"
        )
    return par.finish(outputs, len(specs))


@dataclass
class _Run:
    """What every step of one run reads: the store, the settings, the plan, this process's share of
    the run and the JumpReLU loss terms (shared over data-parallel ranks)."""

    store: ActivationStore
    cfg: TrainConfig
    plan: dict[str, Any]
    par: Parallel
    terms: TermsFn


def _train_steps(
    run: _Run,
    trainees: list[Trainee],
    batches: Iterator[dict[Site, Tensor]],
    start: int,
    log: TrainingLog,
    ckpt: Checkpoint,
    progress: bool,
) -> None:
    """The planned steps from `start` on: every SAE steps on each batch; a log row every
    `cfg.log_every` steps and a checkpoint every `cfg.checkpoint_every` and at the end."""
    cfg, par, n_steps = run.cfg, run.par, run.plan["steps"]
    steps_done = start
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
                for site in t.sites:
                    _check_batch(batch[site], site, t, step_index, run.store)
                row[t.spec.name] = _train_step(run, t, batch, step_index)
            if (step_index + 1) % cfg.log_every == 0 or step_index + 1 == n_steps:
                log.write(row)
            bar.set_postfix_str(_postfix(row, trainees))
            bar.update(1)
            steps_done = step_index + 1
            if steps_done % cfg.checkpoint_every == 0 or steps_done == n_steps:
                for t in trainees:
                    t.keep_good()
                if par.writes:
                    ckpt.save(steps_done, [t.state() for t in trainees])
    if steps_done < n_steps:
        raise StoreError(
            f"the activation store gave {steps_done} batches of {cfg.batch_size}, fewer than the {n_steps} planned"
        )


def _train_step(run: _Run, t: Trainee, batch: dict[Site, Tensor], step_index: int) -> dict[str, float]:
    """One step of one SAE on its sites' part of the step's batch (already / C), with the massive
    activations left out; returns the step's log figures. A spike (see `_spiked`) is not stepped on: the SAE goes
    back to its last checkpoint with half the learning rate."""
    cfg, plan, par = run.cfg, run.plan, run.par
    final = step_index >= plan["steps"] - plan["final_steps"]  # in the part the saved SAE is measured on
    x, target = training_pair(t, batch, par.device, cfg.max_norm)  # [batch', d_in] each
    lr = lr_at(step_index, t.lr, plan["lr_warmup_steps"], plan["lr_decay_steps"], plan["steps"])
    coeff_scale = sparsity_coeff_at(step_index, 1.0, plan["l0_warmup_steps"])
    sq_dev = par.sq_dev(x if target is None else target)
    recon_scale = par.tokens(x.shape[0]) / max(sq_dev, 1e-12) if cfg.optimizer == "signum" else 1.0
    out = _loss(
        t, x, target, coeff_scale, cfg, run.terms, plan["dead_window_tokens"], par.shared_mean, recon_scale
    )
    out = par.share_out(out)
    fvu = float(out["recon"]) * par.tokens(x.shape[0]) / sq_dev
    if spiked(t, float(out["loss"].detach()), fvu, cfg, step_index >= plan["lr_warmup_steps"]):
        recover(t, step_index, fvu)
        dead = float((t.since_fired >= plan["dead_window_tokens"]).float().mean())
        return {
            **{k: float(out[k].detach()) for k in ("loss", "recon", "l0")},
            **{"fvu": fvu, "dead_fraction": dead, "lr": t.lr, "coeff_scale": coeff_scale, "spike": 1.0},
        }
    t.fvu = fvu if t.fvu is None else FVU_MOMENTUM * t.fvu + (1 - FVU_MOMENTUM) * fvu
    _optimizer_step(t, out["loss"], lr, par.reduce_grads if par.data else None)
    if isinstance(t.sae, JumpReLUSAE) and (step_index % DENSITY_EVERY == 0 or final):
        measure_density(t, x, par)
    stats = update_counts(t, x, out, final, plan["dead_window_tokens"], sq_dev, par)
    return {**stats, "lr": lr, "coeff_scale": coeff_scale}


def _terms_fn(fast: bool) -> TermsFn:
    """The JumpReLU loss terms: the reference, or with `fast` the sparse step for SAEs (it
    autoencodes; a transcoder, which has a target, takes the reference)."""
    if not fast:
        return jumprelu_terms
    try:
        from gemmascope.sparse_step import jumprelu_terms_sparse
    except ImportError as err:
        raise ConfigError(
            f"fast training needs gemmascope.sparse_step, which cannot be imported: {err}"
        ) from err

    def terms(
        sae: JumpReLUSAE, x: Tensor, bandwidth: float, target: Tensor | None, prefixes: tuple[int, ...] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if target is None:
            return jumprelu_terms_sparse(sae, x, bandwidth, prefixes)
        return jumprelu_terms(sae, x, bandwidth, target, prefixes)

    return terms


def _init_from_data(
    trainees: list[Trainee], batches: list[dict[Site, Tensor]], cfg: TrainConfig, par: Parallel
) -> None:
    """Start every SAE's data-scaled parameters from the run's first batch (`recipe.init_from_data`;
    a transcoder with a skip connection from the first `SKIP_FIT_BATCHES`, its skip fitted on them);
    data-parallel ranks start from the whole step's batch (their parts gathered in rank order), so
    the start is the single-process one."""
    for t in trainees:
        used = batches if t.sae.W_skip is not None else batches[:1]
        whole = {  # [tokens, d_in], already / C
            s: torch.cat([par.gather(b[s].to(par.device)) for b in used]) for s in used[0]
        }
        x, target = training_pair(t, whole, par.device, cfg.max_norm)
        # λ sets no L0: start where Gemma Scope's "medium" SAEs end, or at 5% of a narrow width
        init_l0 = t.spec.target_l0 or t.spec.k or min(INIT_L0, INIT_DENSITY * t.spec.width)
        init_from_data(t.sae, x, cfg, float(init_l0), target)


def _check_batch(x: Tensor, site: Site, t: Trainee, step_index: int, store: ActivationStore) -> None:
    if x.shape[-1] != t.sae.d_in:
        raise StoreError(f"activations of {site} have d_in {x.shape[-1]}, the SAE expects {t.sae.d_in}")
    if not torch.isfinite(x).all():
        raise StoreError(
            f"activations of {site} in {str(store.root)!r} contain NaN or inf (batch {step_index + 1}); "
            "the store is damaged or the model overflowed: harvest again (in float32)"
        )


def _postfix(row: dict[str, Any], trainees: list[Trainee]) -> str:
    parts = [f"L0 {row[t.spec.name]['l0']:.0f} FVU {row[t.spec.name]['fvu']:.3f}" for t in trainees[:4]]
    return " | ".join(parts) + (" | ..." if len(trainees) > 4 else "")


def _heldout_store(run_dir: Path) -> ActivationStore | None:
    """The run's held-out activations (`run_dir/heldout/`, harvested from the corpus's held-out split
    by the suite and the demo), or None when the run has none."""
    folder = run_dir / HELDOUT
    return ActivationStore(folder) if (folder / ACTIVATIONS).is_dir() else None


def _save_finished(
    t: Trainee,
    run_dir: Path,
    store: ActivationStore,
    tokens: int,
    cfg: TrainConfig,
    plan: dict[str, Any],
    key: str,
    heldout: dict[str, Any] | None,
) -> Path:
    """Fold the scaling in, name the folder by the L0 measured on held-out tokens (on the last 10% of
    training when the run has none), and save; reuse our own folder if a previous attempt of this
    same run already saved it."""
    fin = t.final
    # a spike recovered from in the last steps can leave the final part empty (its sums went back)
    l0 = fin["l0"] / max(fin["steps"], 1)
    fvu = fin["sq_err"] / max(fin["sq_dev"], 1e-12)
    density = fin["fires"].cpu() / max(fin["tokens"], 1)
    measured_on = f"the last {fin['tokens']} training tokens ({FINAL_FRACTION:.0%} of the run)"
    if t.sae.cfg.extra.get("decoder_refit_tokens"):
        measured_on += ", before the decoder refit"
    if t.spec.matryoshka:
        measured_on += " (FVU: the mean over the Matryoshka prefixes)"
    if heldout is not None:
        l0, fvu, density = heldout["l0"], heldout["fvu"], heldout["density"]
        measured_on = f"{heldout['tokens']} held-out tokens"
    train_id = hashlib.sha256(f"{key}/{t.spec.name}".encode()).hexdigest()[:16]
    trained = t.sae.to_jumprelu() if isinstance(t.sae, BatchTopKSAE) else t.sae
    folded = fold_scaling(trained, t.scale, t.out_scale)
    folded.cfg.extra = {
        **trained.cfg.extra,
        "train_id": train_id,
        "l0": l0,
        "fvu": fvu,
        "dead_fraction": float((t.since_fired >= plan["dead_window_tokens"]).float().mean()),
        "measured_on": measured_on,
        "l0_coeff": t.spec.l0_coeff,
        "target_l0": t.spec.target_l0,
        "target_l0_coeff": cfg.target_l0_coeff if t.spec.target_l0 is not None else None,
        "scale": t.scale,
        "out_scale": t.out_scale if t.out_site is not None else None,
        "scale_folded": True,
        "tokens": tokens,
        "store_tokens": plan["store_tokens"],
        "epochs": plan["epochs"],
        "steps": plan["steps"],
        "batch_size": cfg.batch_size,
        "lr": t.spec.lr if t.spec.lr is not None else cfg.lr,  # as asked; lr_final after any recoveries
        "lr_final": t.lr,
        "spike_recoveries": t.recoveries,
        "lr_warmup_steps": plan["lr_warmup_steps"],
        "lr_decay_steps": plan["lr_decay_steps"],
        "l0_warmup_steps": plan["l0_warmup_steps"],
        "dead_window_tokens": plan["dead_window_tokens"],
        "bandwidth": cfg.bandwidth,
        "b_dec_init": cfg.b_dec_init,
        "threshold_init": cfg.threshold_init if cfg.threshold_init is not None else "target firing rate",
        "dead_preact_coeff": cfg.dead_preact_coeff,
        "dense_coeff": cfg.dense_coeff,
        "dense_density": cfg.dense_density,
        "auxk_coeff": cfg.auxk_coeff,
        "max_scaled_norm": cfg.max_norm,
        "optimizer": cfg.optimizer,
        "threshold_lr_ratio": cfg.threshold_lr_ratio if cfg.optimizer == "signum" else 1.0,
        "fixed_biases": cfg.optimizer == "signum" and fixed_biases(t.sae),
        "adam_betas": list(cfg.adam_betas),
        "adam_eps": ADAM_EPS,
        "seed": cfg.seed,
        "fast": cfg.fast,
        "matryoshka_prefixes": list(matryoshka_prefixes(t.spec.width)) if t.spec.matryoshka else None,
        "published": {k: list(v) if isinstance(v, tuple) else v for k, v in PUBLISHED.items()},
    }
    folded.cfg.max_norm = cfg.max_norm * t.scale if cfg.max_norm is not None else None  # raw inputs
    kind = t.spec.architecture
    if t.spec.matryoshka:  # l0_45_matryoshka, l0_45_matryoshka_topk
        kind = "matryoshka" + ("" if kind == "jumprelu" else f"_{kind}")
    if t.out_site is not None:  # saes/mlp_in/layer_L/width_W/l0_K_transcoder (or _skip_transcoder)
        kind = ("skip_" if t.spec.skip else "") + (
            "transcoder" if kind == "jumprelu" else f"{kind}_transcoder"
        )
    base = sae_dir(run_dir, t.site, t.spec.width, l0, architecture=kind)
    for attempt in range(1, 1000):
        folder = base if attempt == 1 else base.with_name(f"{base.name}_v{attempt}")
        if not folder.exists():
            return save_sae(folded, folder, log10_density=torch.log10(density + 1e-10))
        with contextlib.suppress(GemmaScopeError):
            if load_sae(folder).cfg.extra.get("train_id") == train_id:
                return folder  # saved by an earlier attempt of this run, which died before finishing
    raise StoreError(f"too many SAEs named like {str(base)!r}")
