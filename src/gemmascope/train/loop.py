"""The training loop: several SAEs (widths, λs, sites, architectures) from one pass over the activation
store. Each step reads one batch of all the specs' sites at the same token positions and steps every
SAE on it: its architecture's loss terms (`sae.Architecture.terms`), backward, the optimiser with the
decoder-gradient projection and unit-norm rows, the architecture's after-step update, and the spike
guard; each SAE starts from the run's first batch (`init.init_from_data`). At the end it re-solves
each decoder by least squares with the codes fixed (`refit`) and saves each SAE (`save`).

Knows nothing of the model: it reads activations from `activations.ActivationStore` only. What a
run uses is `config.resolve`'s, the recipe's numbers `recipe`'s, one SAE's state and counts
`trainee`'s, checkpoints and the log `checkpoint`'s, processes `distributed`'s, and what an
architecture adds to a step its own (`gemmascope.architectures`): nothing here tests for one.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from gemmascope.activations import ActivationStore
from gemmascope.errors import StoreError
from gemmascope.evals.report import plot_training_log
from gemmascope.runs import ACTIVATIONS, CHECKPOINTS, HELDOUT, REPORT
from gemmascope.sae import SAE, Terms, TrainBatch
from gemmascope.sites import Site
from gemmascope.train.checkpoint import Checkpoint, TrainingLog, read_training_log, run_key
from gemmascope.train.config import Plan, TrainConfig, TrainSpec, resolve
from gemmascope.train.distributed import Parallel
from gemmascope.train.init import SKIP_FIT_BATCHES, init_from_data
from gemmascope.train.optim import averaged
from gemmascope.train.recipe import (
    DENSITY_EVERY,
    FVU_MOMENTUM,
    GOOD_EVERY,
    SHORT_RUN,
    lr_at,
    remove_parallel_grad,
    sparsity_coeff_at,
)
from gemmascope.train.refit import refit_decoder
from gemmascope.train.save import save_trained
from gemmascope.train.trainee import (
    Trainee,
    firing_counts,
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
    share: Callable[[Tensor], Tensor] | None = None,
    recon_scale: float = 1.0,
) -> tuple[dict[str, Tensor], Terms]:
    """The loss of one SAE on a batch `x [batch, d_in]` (already / C) with `target` (None: `x`
    itself; a transcoder's output-site activations), from its architecture's terms, and what the log
    reports; `share` makes a data-parallel rank's batch means the whole batch's where the loss is not
    linear. The reconstruction term enters the loss times `recon_scale` (the sign optimiser: 1 / the
    batch's mean ‖x − mean(x)‖², so that it is the batch FVU, as the penalties' coefficients assume)."""
    assert cfg.dead_window_tokens is not None, "config.resolve sets the dead window"
    batch = TrainBatch(
        x=x,
        target=target,
        dead=t.since_fired >= cfg.dead_window_tokens,  # [d_sae]
        density=t.density,
        prefixes=t.spec.prefixes,
        share=share,
    )
    terms = t.arch.terms(t.sae, batch, t.spec, cfg)
    loss = recon_scale * terms.recon + coeff_scale * terms.sparsity + terms.extra
    out = {"loss": loss, "recon": terms.recon.detach(), "l0": terms.l0.detach(), "fired": terms.fired}
    return out, terms


def _optimizer_step(
    t: Trainee, loss: Tensor, lr: float, reduce_grads: Callable[[SAE], None] | None = None
) -> None:
    """Backward, (data-parallel: gradients averaged over ranks), decoder-gradient projection,
    optimiser step, unit-norm rows."""
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
    run_dir = Path(run_dir)
    store = ActivationStore(run_dir)
    plan = resolve(store, specs, tokens, config or TrainConfig())
    cfg, specs = plan.config, plan.specs
    par = Parallel.start(cfg, specs, store)  # one process unless torchrun started several
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
    batches = par.batches(store, sites, cfg, plan.epochs, plan.steps)
    if start == 0:
        # the first batch starts every SAE; a transcoder's skip connection is fitted on a few more
        skips = any(t.sae.W_skip is not None for t in trainees)
        first = list(itertools.islice(batches, SKIP_FIT_BATCHES if skips else 1))
        _init_from_data(trainees, first, cfg, par)
        batches = itertools.chain(first, batches)
    for t in trainees:
        t.keep_good()
    stages: dict[str, Any] = {"resumed_at_step": start} if start else {}
    with _timed(stages, "steps"):
        _train_steps(_Run(store, plan, par), trainees, batches, start, log, ckpt, progress)
    log.close()
    outputs: list[Path] = []
    if par.writes:
        heldout = _heldout_store(run_dir)
        for t in trainees:
            seconds = dict(stages)
            t.sae.cfg.extra["stage_seconds"] = seconds
            with averaged(t.optimizer):  # the sign optimiser's average is the SAE it trained
                if cfg.refit_tokens:
                    with _timed(seconds, "refit"):
                        n = refit_decoder(t, store, cfg, min(tokens, cfg.refit_tokens), progress)
                    t.sae.cfg.extra["decoder_refit_tokens"] = n
                with _timed(seconds, "heldout"):
                    figures = measure_heldout(t, heldout, cfg)
                outputs.append(save_trained(t, run_dir, plan, key, figures))
        ckpt.finish(outputs)
        plot_training_log(
            read_training_log(log.path), run_dir / REPORT / f"{cfg.name}{par.suffix}_curves.png"
        )
    return par.finish(outputs, len(specs))


@contextlib.contextmanager
def _timed(into: dict[str, Any], stage: str) -> Iterator[None]:
    """Record the wall and CPU seconds (this process, every thread) of the block as `into[stage]`
    (the steps of every SAE of a run are one stage, shared; a resumed run times only its own part)."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    into[stage] = {"wall": round(time.perf_counter() - wall, 2), "cpu": round(time.process_time() - cpu, 2)}


@dataclass
class _Run:
    """What every step of one run reads: the store, the resolved plan and this process's share of
    the run."""

    store: ActivationStore
    plan: Plan
    par: Parallel


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
    `cfg.log_every` steps, a checkpoint every `cfg.checkpoint_every` and at the end, and the state a
    spike goes back to every GOOD_EVERY steps and at each checkpoint."""
    cfg, par, n_steps = run.plan.config, run.par, run.plan.steps
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
            save = steps_done % cfg.checkpoint_every == 0 or steps_done == n_steps
            if save or steps_done % GOOD_EVERY == 0:  # at every checkpoint too: a resumed run's is its own
                for t in trainees:
                    t.keep_good()
            if save and par.writes:
                ckpt.save(steps_done, [t.state() for t in trainees])
    if steps_done < n_steps:
        raise StoreError(
            f"the activation store gave {steps_done} batches of {cfg.batch_size}, fewer than the {n_steps} planned"
        )


def _train_step(run: _Run, t: Trainee, batch: dict[Site, Tensor], step_index: int) -> dict[str, float]:
    """One step of one SAE on its sites' part of the step's batch (already / C), with the massive
    activations left out; returns the step's log figures. A spike (see `trainee.spiked`) is not
    stepped on: the SAE goes back to its last good state (every GOOD_EVERY steps) with half the lr."""
    plan, par = run.plan, run.par
    cfg = plan.config
    assert (
        cfg.lr_warmup_steps is not None and cfg.lr_decay_steps is not None and cfg.l0_warmup_steps is not None
    )
    assert cfg.dead_window_tokens is not None
    final = step_index >= plan.steps - plan.final_steps  # in the part the saved SAE is measured on
    x, target = training_pair(t, batch, par.device, cfg.max_norm)  # [batch', d_in] each
    lr = lr_at(step_index, t.lr, cfg.lr_warmup_steps, cfg.lr_decay_steps, plan.steps)
    coeff_scale = sparsity_coeff_at(step_index, 1.0, cfg.l0_warmup_steps)
    sq_dev = par.sq_dev(x if target is None else target)
    recon_scale = par.tokens(x.shape[0]) / max(sq_dev, 1e-12) if cfg.optimizer == "signum" else 1.0
    out, terms = _loss(t, x, target, coeff_scale, cfg, par.shared_mean, recon_scale)
    out = par.share_out(out)
    fvu = float(out["recon"]) * par.tokens(x.shape[0]) / sq_dev
    if spiked(t, float(out["loss"].detach()), fvu, cfg, step_index >= cfg.lr_warmup_steps):
        recover(t, step_index, fvu)
        dead = float((t.since_fired >= cfg.dead_window_tokens).float().mean())
        return {
            **{k: float(out[k].detach()) for k in ("loss", "recon", "l0")},
            **{"fvu": fvu, "dead_fraction": dead, "lr": t.lr, "coeff_scale": coeff_scale, "spike": 1.0},
        }
    t.fvu = fvu if t.fvu is None else FVU_MOMENTUM * t.fvu + (1 - FVU_MOMENTUM) * fvu
    _optimizer_step(t, out["loss"], lr, par.reduce_grads if par.data else None)
    t.arch.after_step(t.sae, terms)
    if t.arch.tracks_density and step_index % DENSITY_EVERY == 0:  # from the step's own forward
        measure_density(t, out["fired"], par.tokens(x.shape[0]))
    fires = firing_counts(t, x, par) if final else None  # the final part: as the saved SAE fires
    stats = update_counts(t, x, out, fires, cfg.dead_window_tokens, sq_dev, par)
    return {**stats, "lr": lr, "coeff_scale": coeff_scale}


def _init_from_data(
    trainees: list[Trainee], batches: list[dict[Site, Tensor]], cfg: TrainConfig, par: Parallel
) -> None:
    """Start every SAE's data-scaled parameters from the run's first batch (`init.init_from_data`;
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
        init_l0 = (
            t.spec.target_l0 or t.spec.k or min(SHORT_RUN.init_l0, SHORT_RUN.init_density * t.spec.width)
        )
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
