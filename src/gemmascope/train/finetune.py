"""End-to-end fine-tuning of a trained SAE or transcoder with the model (Gemma Scope 2's optional
last stage): `finetune` splices it into the model (`evals.splice`) and trains its weights on

    (FVU + α·β·KL) / (1 + β),   α = FVU₀ / (KL₀ + 1e-8) measured on the first batch and held constant,

where FVU is the spliced output's error as a fraction of the batch's variance and KL is KL(clean
next-token distribution ‖ the one with the splice), per counted prediction, both over the positions
`evals.edited_batches` keeps (not BOS/EOS/pad, no massive input: the rule of the evaluation). α puts
both terms on one scale at the start, so β alone says how much the model's behaviour counts
against faithful reconstruction. A transcoder is fine-tuned on what it replaces: its prediction
from the MLP input is written into the MLP output in the same pass, the FVU is that of the MLP
output, the KL that of the model with its MLP replaced. The model is frozen.

Fine-tuning is training: the optimiser is training's (`optim.make_optimizer`, Adam), with training's
rules for which parameters learn (the thresholds get no gradient here, the skip connection stays as
fitted, the biases stay where `optim.fixed_biases` keeps them); the decoder rows keep their norms as
loaded (`recipe.remove_parallel_grad`, then the norms put back); a checkpoint (`checkpoint.Checkpoint`)
is written every `checkpoint_every` steps and the steps go to a training log (`TrainingLog`), so a
killed fine-tune run again resumes from its last checkpoint and ends bit for bit where an
uninterrupted one ends.

Owns the fine-tune loop, `check_settings` (every argument checked before a model is loaded) and
`finetune_folder`, which reads an SAE folder and writes the fine-tuned SAE beside it. Knows nothing
of the CLI; evaluation is `evals`'.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gemmascope.corpus import DEFAULT_CORPUS, token_rows
from gemmascope.errors import ConfigError
from gemmascope.evals.core import EditBatch, edited_batches, splice
from gemmascope.evals.metrics import fvu
from gemmascope.formats import load_log10_density, load_sae, save_sae
from gemmascope.models import LanguageModel
from gemmascope.runs import CHECKPOINTS, REPORT, run_of, sae_id
from gemmascope.sae import SAE
from gemmascope.train.checkpoint import Checkpoint, TrainingLog
from gemmascope.train.optim import fixed_biases, make_optimizer
from gemmascope.train.recipe import remove_parallel_grad

# Short-run values (measured in BENCHMARKS.md, "End-to-end fine-tune"). GS2 gives the loss, not these.
LR = 1e-4  # Adam, for the weights that learn
BETA = 1.0
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
TOKENS = 16_384
BATCH_ROWS = 4
CONTEXT_LEN = 128
CHECKPOINT_EVERY = 5  # steps (each a clean pass, a spliced pass and a backward through the model)
FINETUNED_SUFFIX = "_finetuned"
NAME_PREFIX = "finetune_"  # checkpoints/finetune_ID/ and report/finetune_ID_log.jsonl of the run


@dataclass(frozen=True)
class FinetuneSettings:
    """What one fine-tune does (`check_settings` makes one): every value that changes the result
    is part of the checkpoint's run key; `checkpoint_every` is not."""

    tokens: int = TOKENS
    lr: float = LR
    beta: float = BETA
    corpus: str = DEFAULT_CORPUS
    batch_rows: int = BATCH_ROWS
    context_len: int = CONTEXT_LEN
    seed: int = 0
    checkpoint_every: int = CHECKPOINT_EVERY


def check_settings(**kwargs: Any) -> FinetuneSettings:
    """`FinetuneSettings(**kwargs)` checked, before any model or SAE is loaded: whole numbers where
    counts are meant (tokens, batch_rows, checkpoint_every >= 1, context_len >= 2, seed >= 0), lr
    finite and > 0, beta finite and >= 0. A ConfigError names the value and what was expected."""
    unknown = sorted(set(kwargs) - set(FinetuneSettings.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown fine-tune setting {unknown[0]!r}")
    settings = FinetuneSettings(**kwargs)
    for name, least in (
        ("tokens", 1),
        ("batch_rows", 1),
        ("checkpoint_every", 1),
        ("context_len", 2),
        ("seed", 0),
    ):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} {value!r} must be a whole number >= {least}")
    for name, positive in (("lr", True), ("beta", False)):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} {value!r} must be a number")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ConfigError(f"{name} {value!r} must be finite and {'> 0' if positive else '>= 0'}")
    return settings


def finetune(
    model: LanguageModel,
    sae: SAE,
    tokens: int = TOKENS,
    *,
    checkpoints: Path | None = None,
    log: Path | None = None,
    restart: bool = False,
    progress: bool = True,
    **settings: Any,
) -> tuple[SAE, dict[str, Any]]:
    """A copy of `sae` fine-tuned on about `tokens` training tokens with it spliced into `model`
    (module docstring; `settings`: the other fields of `FinetuneSettings`), and what happened: α,
    the first and last batches' FVU and KL, tokens, steps, seconds. `sae` itself is left unchanged.

    With `checkpoints` (a folder), a checkpoint is written there every `checkpoint_every` steps and
    one found there resumes (an unfinished one of other settings or another SAE: a StoreError,
    unless `restart` discards it); with `log`, a row per step goes to that training log. The caller
    marks the run finished (`Checkpoint.finish`) once the result is saved: `finetune_folder`."""
    s = check_settings(tokens=tokens, **settings)
    tuned = _trainable_copy(sae)
    optimizer = make_optimizer(tuned, "adam", s.lr, s.lr, ADAM_BETAS, ADAM_EPS)
    norms = sae.W_dec.detach().norm(dim=-1, keepdim=True)  # [d_sae, 1]: kept as loaded
    ids = token_rows(
        model.tokenizer, s.tokens, s.corpus, "train", s.context_len, count_bos=False, exact=False
    )
    ids = ids[torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(s.seed))]
    ckpt = None if checkpoints is None else Checkpoint(checkpoints, run_key(model, sae, s))
    state = _State()
    resumed = None if ckpt is None else ckpt.load(restart)
    if resumed is not None:
        state = _State(**{k: resumed["trainees"][0][k] for k in ("step", "alpha", "history")})
        tuned.load_state_dict(resumed["trainees"][0]["sae"])
        optimizer.load_state_dict(resumed["trainees"][0]["optimizer"])
        torch.set_rng_state(resumed["torch_rng"])
    training_log = None if log is None else TrainingLog(log, resume_after=state.step)
    model.hf.requires_grad_(False)
    started = time.monotonic()
    batches = edited_batches(
        model, ids, [tuned], s.batch_rows, start=state.step * s.batch_rows, min_tokens=1,
        desc="fine-tune", progress=progress,
    )  # fmt: skip
    with closing(batches):  # a failed step (a full disk) closes the progress bar before its error shows
        for batch in batches:
            row = _step(model, tuned, optimizer, norms, batch, state, s.beta)
            state.step += 1
            if training_log is not None:
                training_log.write({"step": state.step, **row})
            if ckpt is not None and state.step % s.checkpoint_every == 0:
                ckpt.save(state.step, [state.to_checkpoint(tuned, optimizer)])
    if training_log is not None:
        training_log.close()
    info = state.info(int(ids.numel()), time.monotonic() - started, s)
    tuned.cfg.extra = {**tuned.cfg.extra, "finetune": info}
    return tuned, info


@dataclass
class _State:
    """What a fine-tune carries from step to step (and in its checkpoint): the steps taken, α and
    each step's terms."""

    step: int = 0
    alpha: float | None = None
    history: list[dict[str, float]] | None = None

    def to_checkpoint(self, tuned: SAE, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {
            "step": self.step,
            "alpha": self.alpha,
            "history": self.history,
            "sae": tuned.state_dict(),
            "optimizer": optimizer.state_dict(),
        }

    def info(self, tokens: int, seconds: float, s: FinetuneSettings) -> dict[str, Any]:
        history = self.history or []
        tail = history[-max(1, len(history) // 10) :]
        return {
            "tokens": tokens,
            "steps": self.step,
            "seconds": seconds,
            "lr": s.lr,
            "beta": s.beta,
            "alpha": self.alpha,
            "first": history[0] if history else None,
            "last_10pct": {k: sum(h[k] for h in tail) / len(tail) for k in ("fvu", "kl", "loss")}
            if history
            else None,
        }


def _step(
    model: LanguageModel,
    tuned: SAE,
    optimizer: torch.optim.Optimizer,
    norms: Tensor,
    batch: EditBatch,
    state: _State,
    beta: float,
) -> dict[str, float]:
    """One optimiser step on `batch` (a batch with no counted prediction takes none) and its terms."""
    if batch.targets.numel() == 0:
        return {"fvu": math.nan, "kl": math.nan, "loss": math.nan}
    recon, kl = terms(model, tuned, batch)
    if state.alpha is None:
        state.alpha = float(recon.detach()) / (float(kl.detach()) + 1e-8)
    loss = (recon + state.alpha * beta * kl) / (1 + beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    remove_parallel_grad(tuned.W_dec)
    optimizer.step()
    with torch.no_grad():  # the rows' norms put back exactly
        tuned.W_dec.mul_(norms / tuned.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    row = {"fvu": float(recon.detach()), "kl": float(kl.detach()), "loss": float(loss.detach())}
    state.history = [*(state.history or []), row]
    return row


def terms(model: LanguageModel, sae: SAE, batch: EditBatch) -> tuple[Tensor, Tensor]:
    """The fine-tune loss's two terms on one batch of `evals.edited_batches` (made with `[sae]`):
    the FVU of what the splice writes (an SAE's reconstruction of its site, a transcoder's
    prediction of the MLP output) at the kept positions, and the mean KL(clean ‖ spliced) over the
    counted predictions; both differentiable in the SAE's weights."""
    seen: list[tuple[Tensor, Tensor]] = []
    _, kl = batch.under(splice(model, [sae], batch.keep, lambda _sae, y, y_hat: seen.append((y, y_hat))))
    return fvu(*seen[0]), kl.mean()


def run_key(model: LanguageModel, sae: SAE, s: FinetuneSettings) -> str:
    """What makes two fine-tunes the same run: the model, the SAE's weights and every setting that
    changes the numbers (not how often a checkpoint is written)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    settings = {k: v for k, v in s.__dict__.items() if k != "checkpoint_every"}
    return json.dumps({"model": model.name, "sae": digest.hexdigest(), "config": settings}, sort_keys=True)


def finetune_folder(
    model: LanguageModel,
    folder: Path | str,
    out: Path | str | None = None,
    *,
    restart: bool = False,
    progress: bool = True,
    **settings: Any,
) -> tuple[Path, dict[str, Any]]:
    """Fine-tune the SAE in `folder` (`finetune`'s settings) and save it to `out` (default: the
    folder's name + `_finetuned`, beside it). An existing `out` is never replaced. Checkpoints go to
    `RUN/checkpoints/finetune_ID/` and the log to `RUN/report/finetune_ID_log.jsonl` (RUN the run
    folder holding `folder`, else its parent; ID the output's `runs.sae_id`): a killed fine-tune run again resumes. The density
    file is copied from the original (it is refreshed by `gemmascope eval`)."""
    s = check_settings(**settings)
    folder = Path(folder)
    target = finetuned_path(folder, out)
    sae = load_sae(folder)
    base = run_of(folder) or folder.parent
    name = NAME_PREFIX + sae_id(target)
    tuned, info = finetune(
        model, sae, checkpoints=base / CHECKPOINTS / name, log=base / REPORT / f"{name}_log.jsonl",
        restart=restart, progress=progress, **settings,
    )  # fmt: skip
    tuned.cfg.extra["finetuned_from"] = folder.name
    # what the trainer measured describes the SAE before fine-tuning; `gemmascope eval` measures this one
    tuned.cfg.extra["measured_on"] = f"{tuned.cfg.extra.get('measured_on', '?')}, before fine-tuning"
    saved = save_sae(tuned, target, log10_density=load_log10_density(folder))
    Checkpoint(base / CHECKPOINTS / name, run_key(model, sae, s)).finish([saved])
    return saved, info


def finetuned_path(folder: Path | str, out: Path | str | None = None) -> Path:
    """Where the fine-tune of `folder` goes: `out`, or the folder's name + `_finetuned` beside it; a
    ConfigError when it already exists (a fine-tune never replaces a folder)."""
    folder = Path(folder)
    target = Path(out) if out is not None else folder.with_name(folder.name + FINETUNED_SUFFIX)
    if target.exists():
        raise ConfigError(f"{str(target)!r} already exists: give another --out or remove it first")
    return target


def _trainable_copy(sae: SAE) -> SAE:
    """A copy of `sae` whose parameters learn as in training: the JumpReLU thresholds (no gradient
    reaches them here) and a transcoder's skip connection stay; the biases stay where
    `optim.fixed_biases` says training keeps them."""
    tuned = type(sae)(sae.cfg.__class__(**sae.cfg.to_dict()))
    tuned.load_state_dict(sae.state_dict())
    tuned.to(sae.W_enc.device)
    frozen = [getattr(tuned, "threshold", None), tuned.W_skip]
    if fixed_biases(tuned):
        frozen += [tuned.b_enc, tuned.b_dec]
    for p in frozen:
        if isinstance(p, torch.nn.Parameter):
            p.requires_grad_(False)
    return tuned
