"""End-to-end fine-tuning of a trained SAE with the model (Gemma Scope 2's optional last stage):
`finetune` splices the SAE into the model at its site and trains its weights on the loss

    (MSE + α·β·KL) / (1 + β),   α = MSE₀ / (KL₀ + 1e-8) measured on the first batch and held constant,

where MSE is the reconstruction's squared error as a fraction of the batch's variance (the FVU) and
KL is KL(clean next-token distribution ‖ the one with the SAE spliced in), per predicted token. α
puts both terms on the same scale at the start, so β alone says how much the model's behaviour
counts against faithful reconstruction. The thresholds stay as trained (no straight-through
gradient reaches them here), so L0 moves only as far as the encoder does; the model is frozen.

Owns the fine-tune loop and `finetune_folder`, which reads an SAE folder and writes the fine-tuned
SAE next to it. Knows nothing of the CLI; evaluation is `evals`'.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from gemmascope.corpus import DEFAULT_CORPUS, special_mask, token_rows
from gemmascope.errors import ConfigError
from gemmascope.formats import load_log10_density, load_sae, save_sae
from gemmascope.models import LanguageModel
from gemmascope.sae import SAE, JumpReLUSAE, massive_mask, sae_site
from gemmascope.sites import Site, edit_site
from gemmascope.train.recipe import remove_parallel_grad

# Short-run values (measured in BENCHMARKS.md, "End-to-end fine-tune"). GS2 gives the loss, not these.
LR = 1e-4  # Adam, for W_enc and W_dec; biases at LR x their scale C (they are stored folded, in raw units)
BETA = 1.0
BATCH_ROWS = 4
CONTEXT_LEN = 128
FINETUNED_SUFFIX = "_finetuned"


def finetune(
    model: LanguageModel,
    sae: SAE,
    tokens: int = 16_384,
    *,
    lr: float = LR,
    beta: float = BETA,
    corpus: str = DEFAULT_CORPUS,
    batch_rows: int = BATCH_ROWS,
    context_len: int = CONTEXT_LEN,
    seed: int = 0,
    progress: bool = True,
) -> tuple[SAE, dict[str, Any]]:
    """A copy of `sae` fine-tuned on about `tokens` training tokens of `corpus` with the SAE spliced
    into `model` (module docstring), and what happened: α, the first and last batches' MSE and KL,
    tokens, steps, seconds. `sae` itself is left unchanged."""
    for name, value in (("tokens", tokens), ("batch_rows", batch_rows), ("context_len", context_len)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} {value!r} must be a whole number >= 1")
    if not (math.isfinite(lr) and lr > 0) or not (math.isfinite(beta) and beta >= 0):
        raise ConfigError(f"lr {lr!r} must be > 0 and beta {beta!r} >= 0, both finite")
    site = sae_site(model, sae)
    tuned = _copy(sae)
    scale = float(tuned.cfg.extra.get("scale") or 1.0)
    optimizer = torch.optim.Adam(
        [
            {"params": [tuned.W_enc, tuned.W_dec], "lr": lr},
            {"params": [tuned.b_enc, tuned.b_dec], "lr": lr * scale},
        ]
    )
    ids = token_rows(model.tokenizer, tokens, corpus, "train", context_len, count_bos=False, exact=False)
    torch.manual_seed(seed)
    ids = ids[torch.randperm(ids.shape[0])]
    model.hf.requires_grad_(False)
    row_norms = tuned.W_dec.detach().norm(dim=-1, keepdim=True)  # [d_sae, 1]: kept as loaded
    alpha: float | None = None
    history: list[dict[str, float]] = []
    started = time.monotonic()
    for start in tqdm(
        range(0, ids.shape[0], batch_rows), desc="fine-tune", unit="batch", disable=not progress
    ):
        batch = ids[start : start + batch_rows].to(model.device)
        mse, kl = _terms(model, tuned, site, batch)
        if alpha is None:
            alpha = float(mse.detach()) / (float(kl.detach()) + 1e-8)
        loss = (mse + alpha * beta * kl) / (1 + beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        remove_parallel_grad(tuned.W_dec)
        optimizer.step()
        with torch.no_grad():  # and the rows' norms put back exactly
            tuned.W_dec.mul_(row_norms / tuned.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        history.append({"mse": float(mse.detach()), "kl": float(kl.detach()), "loss": float(loss.detach())})
    seconds = time.monotonic() - started
    tail = max(1, len(history) // 10)
    info = {
        "tokens": int(ids.numel()),
        "steps": len(history),
        "seconds": seconds,
        "lr": lr,
        "beta": beta,
        "alpha": alpha,
        "first": history[0] if history else None,
        "last_10pct": {k: sum(h[k] for h in history[-tail:]) / tail for k in ("mse", "kl", "loss")}
        if history
        else None,
    }
    tuned.cfg.extra = {**tuned.cfg.extra, "finetune": info}
    return tuned, info


def finetune_folder(
    model: LanguageModel, folder: Path | str, out: Path | str | None = None, **kwargs: Any
) -> tuple[Path, dict[str, Any]]:
    """Fine-tune the SAE in `folder` (`finetune`'s keyword arguments) and save it to `out` (default:
    the folder's name + `_finetuned`, beside it). An existing `out` is never replaced. The density file
    is copied from the original (it is refreshed by `gemmascope eval`)."""
    folder = Path(folder)
    target = Path(out) if out is not None else folder.with_name(folder.name + FINETUNED_SUFFIX)
    if target.exists():
        raise ConfigError(f"{str(target)!r} already exists: give another --out or remove it first")
    sae = load_sae(folder)
    tuned, info = finetune(model, sae, **kwargs)
    tuned.cfg.extra["finetuned_from"] = folder.name
    # what the trainer measured describes the SAE before fine-tuning; `gemmascope eval` measures this one
    tuned.cfg.extra["measured_on"] = f"{tuned.cfg.extra.get('measured_on', '?')}, before fine-tuning"
    return save_sae(tuned, target, log10_density=load_log10_density(folder)), info


def _terms(model: LanguageModel, sae: SAE, site: Site, batch: Tensor) -> tuple[Tensor, Tensor]:
    """The fine-tune loss's two terms on `batch [B, T]` token ids: the spliced reconstruction's FVU
    at `site` (over text positions that are not massive) and the batch-mean KL(clean ‖ spliced) of
    the next-token distributions at text positions; both differentiable in the SAE's weights."""
    keep = ~special_mask(batch, model.special_token_ids)  # [B, T]
    with torch.no_grad():
        clean = model.hf(input_ids=batch, use_cache=False).logits[:, :-1].float()  # [B, T-1, vocab]
    seen: dict[str, Tensor] = {}
    device = sae.W_enc.device

    def splice(act: Tensor) -> Tensor:
        x = act.to(device, sae.W_enc.dtype)
        where = keep.to(device) & ~massive_mask(sae, act).to(device)  # [B, T]
        x_hat = sae(x)
        err = (x_hat - x)[where]
        seen["mse"] = err.pow(2).sum() / (x[where] - x[where].mean(0)).pow(2).sum().clamp_min(1e-12)
        return torch.where(where[..., None], x_hat, x).to(act.dtype)

    with edit_site(model, site, splice):
        spliced = model.hf(input_ids=batch, use_cache=False).logits[:, :-1].float()
    predict = keep[:, :-1] & keep[:, 1:]  # text predicting text (not from BOS, not of EOS or pad)
    log_p, log_q = F.log_softmax(clean[predict], -1), F.log_softmax(spliced[predict], -1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    return seen["mse"], kl


def _copy(sae: SAE) -> SAE:
    tuned = type(sae)(sae.cfg.__class__(**sae.cfg.to_dict()))
    tuned.load_state_dict(sae.state_dict())
    tuned.to(sae.W_enc.device)
    if isinstance(tuned, JumpReLUSAE):
        tuned.threshold.requires_grad_(False)
    return tuned
