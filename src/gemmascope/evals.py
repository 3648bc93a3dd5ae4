"""Evaluations of SAEs, the Gemma Scope / SAEBench "core" way (RECIPE.md section 4), plus SAEBench-style
sparse probing. Owns: the metrics (L0, L1, FVU and variance explained, MSE, cosine similarity,
shrinkage, delta LM loss, CE loss recovered against zero-ablation, KL(clean || spliced), dead, dense and
alive fractions, the log10 density histogram, reconstruction error by token position), the splice
of a reconstruction into the real forward pass, the probes, the per-SAE `eval.json`, the run-level
`report/evals.json` and the PNG plots.

Every metric is taken over non-special tokens only (BOS, EOS and pad excluded), on held-out text.
The clean forward pass and the activations at every SAE's site come from one pass; the zero-ablation
pass is one per site and the spliced pass one per SAE (they differ by construction).

Knows nothing of the server, of training, or of how SAE files are laid out (formats.py does that).
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from gemmascope.corpus import load_corpus, pack, special_mask
from gemmascope.errors import ConfigError, CorpusError
from gemmascope.models import LanguageModel, Site, capture, edit_site, parse_site, site_d_in
from gemmascope.sae import SAE, norm_limit

MIN_EVAL_TOKENS = 1024  # fewer non-special tokens than this and dead/dense/CE numbers mean little
DENSE_DENSITY = 0.1  # a latent firing on more than 10% of tokens is dense (Gemma Scope 2)
DENSITY_BIN_EDGES = [x / 10 for x in range(-80, 1)]  # log10 density, -8 .. 0 in tenths of a decade
PROBE_KS = (1, 2, 5)
# Topic labels that say "no topic"; articles carrying them are left out of probing.
_NO_TOPIC = {"", "uncategorized", "none"}

SAEs = Mapping[str, SAE] | Sequence[SAE]


# ---------------------------------------------------------------------------------------------
# Scores defined from the accumulated numbers (kept separate so they can be checked by hand)


def ce_loss_score(ce_clean: float, ce_sae: float, ce_ablation: float) -> float:
    """CE loss recovered: `(CE_ablation - CE_sae) / (CE_ablation - CE_clean)`; 1 is a perfect
    splice, 0 is no better than zero-ablating the site."""
    return (ce_ablation - ce_sae) / (ce_ablation - ce_clean) if ce_ablation != ce_clean else float("nan")


def kl_div_score(kl_sae: float, kl_ablation: float) -> float:
    """SAEBench's KL score: `(KL_ablation - KL_sae) / KL_ablation`; 1 means no change in the
    next-token distributions."""
    return (kl_ablation - kl_sae) / kl_ablation if kl_ablation != 0 else float("nan")


def density_histogram(density: Tensor) -> dict[str, Any]:
    """Histogram of log10 latent density (`density [d_sae]`, the fraction of tokens each latent fires
    on) over `DENSITY_BIN_EDGES`; dead latents (density 0) are counted apart in `n_dead`."""
    alive = density[density > 0].double()
    logd = alive.log10().clamp(DENSITY_BIN_EDGES[0], DENSITY_BIN_EDGES[-1])
    counts = torch.histogram(logd, bins=torch.tensor(DENSITY_BIN_EDGES, dtype=torch.float64)).hist
    return {
        "log10_bin_edges": DENSITY_BIN_EDGES,
        "counts": [int(c) for c in counts.tolist()],
        "n_dead": int((density == 0).sum()),
    }


@dataclass
class ReconstructionStats:
    """Running sums for the reconstruction and sparsity metrics of one SAE. Feed it batches of
    activations `x [N, d_in]`, reconstructions `x_hat [N, d_in]`, latents `f [N, d_sae]` and each
    token's position `[N]`; `metrics()` gives L0, FVU and the rest over everything fed."""

    d_sae: int
    context_len: int
    n_tokens: int = 0
    sum_x: Tensor | None = None  # [d_in] float64: for the mean in the FVU denominator
    sum_sq_x: float = 0.0
    sum_err: float = 0.0  # sum of ||x - x_hat||^2
    sum_l0: float = 0.0
    sum_l1: float = 0.0
    sum_cos: float = 0.0
    sum_norm_in: float = 0.0
    sum_norm_out: float = 0.0
    sum_ratio: float = 0.0
    sum_xhat_sq: float = 0.0
    sum_x_dot_xhat: float = 0.0
    fired: Tensor = field(init=False)  # [d_sae] int64: tokens each latent fired on
    err_by_position: Tensor = field(init=False)  # [context_len] float64
    n_by_position: Tensor = field(init=False)  # [context_len] int64

    def __post_init__(self) -> None:
        self.fired = torch.zeros(self.d_sae, dtype=torch.int64)
        self.err_by_position = torch.zeros(self.context_len, dtype=torch.float64)
        self.n_by_position = torch.zeros(self.context_len, dtype=torch.int64)

    def update(self, x: Tensor, x_hat: Tensor, f: Tensor, positions: Tensor) -> None:
        x, x_hat = x.detach().double(), x_hat.detach().double()
        active = f.detach() > 0
        err = (x - x_hat).pow(2).sum(-1)  # [N]
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.n_tokens += x.shape[0]
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_sq_x += float(x.pow(2).sum())
        self.sum_err += float(err.sum())
        self.sum_l0 += float(active.sum())
        self.sum_l1 += float(f.detach().double().abs().sum())
        # a zero vector has no direction: count its cosine as 0, as F.cosine_similarity does
        self.sum_cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum())
        self.sum_norm_in += float(norm_in.sum())
        self.sum_norm_out += float(norm_out.sum())
        self.sum_ratio += float((norm_out / norm_in.clamp_min(1e-12)).sum())
        self.sum_xhat_sq += float(x_hat.pow(2).sum())
        self.sum_x_dot_xhat += float((x * x_hat).sum())
        self.fired += active.sum(0).cpu()
        pos = positions.cpu()
        self.err_by_position.index_add_(0, pos, err.cpu())
        self.n_by_position.index_add_(0, pos, torch.ones_like(pos))

    def total_variance(self) -> float:
        """`sum ||x - mean(x)||^2` over the tokens fed (mean per dimension)."""
        assert self.sum_x is not None
        return self.sum_sq_x - float(self.sum_x.pow(2).sum()) / self.n_tokens

    def metrics(self) -> dict[str, Any]:
        if self.n_tokens == 0:
            raise CorpusError("no non-special tokens were evaluated")
        n = self.n_tokens
        total_var = self.total_variance()
        fvu = self.sum_err / total_var if total_var > 0 else float("nan")
        density = self.fired.double() / n
        per_token_var = total_var / n
        by_pos = [
            None if int(c) == 0 else float(e) / int(c) / per_token_var
            for e, c in zip(self.err_by_position.tolist(), self.n_by_position.tolist(), strict=True)
        ]
        return {
            "l0": self.sum_l0 / n,
            "l1": self.sum_l1 / n,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": self.sum_err / n / (self.sum_x.numel() if self.sum_x is not None else 1),
            "cossim": self.sum_cos / n,
            "l2_norm_in": self.sum_norm_in / n,
            "l2_norm_out": self.sum_norm_out / n,
            "l2_ratio": self.sum_ratio / n,
            "relative_reconstruction_bias": (
                self.sum_xhat_sq / self.sum_x_dot_xhat if self.sum_x_dot_xhat != 0 else float("nan")
            ),
            "frac_alive": float((density > 0).double().mean()),
            "frac_dead": float((density == 0).double().mean()),
            "frac_dense": float((density > DENSE_DENSITY).double().mean()),
            "freq_over_1_percent": float((density > 0.01).double().mean()),
            "freq_over_10_percent": float((density > 0.1).double().mean()),
            "density_histogram": density_histogram(density),
            "log10_density": density,
            # mean ||x - x_hat||^2 at each position over the mean total variance per token: its
            # token-weighted mean is the FVU. Position 0 (BOS) is never evaluated.
            "fvu_by_position": by_pos,
        }


class CleanDistribution:
    """The clean next-token distributions of a batch, kept to compare edited passes against.

    With `logits [N, vocab]`, log p = logits - logsumexp(logits), so for an edited pass
    KL(clean || edited) = sum p_clean log p_clean - sum p_clean * logits_edited + logsumexp(logits_edited):
    one exp pass and one dot product per edited pass, no `[N, vocab]` log-softmax materialised."""

    def __init__(self, logits: Tensor) -> None:
        logits = logits.float()
        lse = logits.logsumexp(-1)  # [N]
        self.probs = (logits - lse[:, None]).exp()  # [N, vocab]
        self.neg_entropy = _row_dot(self.probs, logits) - lse  # [N]: sum p log p
        self.logits = logits

    def compare(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-entropy `[N]` of `logits [N, vocab]` on `targets [N]`, and KL(clean || these) `[N]`."""
        logits = logits.float()
        lse = logits.logsumexp(-1)
        ce = lse - logits.gather(-1, targets[:, None]).squeeze(-1)
        kl = self.neg_entropy - (_row_dot(self.probs, logits) - lse)
        return ce, kl


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """`[N, V], [N, V] -> [N]`: row-wise dot products in one batched matmul."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).flatten()


@dataclass
class NextTokenStats:
    """Running sums of next-token cross-entropy and KL(clean || edited) for one kind of pass."""

    n: int = 0
    sum_ce: float = 0.0
    sum_kl: float = 0.0

    def update(self, ce: Tensor, kl: Tensor) -> None:
        """Add per-prediction cross-entropies `ce [N]` and KL divergences `kl [N]`."""
        self.n += ce.shape[0]
        self.sum_ce += float(ce.double().sum())
        self.sum_kl += float(kl.double().sum())

    @property
    def ce(self) -> float:
        return self.sum_ce / self.n if self.n else float("nan")

    @property
    def kl(self) -> float:
        return self.sum_kl / self.n if self.n else float("nan")


# ---------------------------------------------------------------------------------------------
# Checking what is asked


def sae_site(model: LanguageModel, sae: SAE) -> Site:
    """The model site an SAE reads, checked against the model: the layer exists and the activation
    there is `d_in` wide. Errors name the SAE's values and the model's."""
    if not sae.cfg.site:
        raise ConfigError(
            f"SAE ({sae.cfg.architecture}, d_sae={sae.d_sae}) names no site; expected e.g. 'resid_post.6'"
        )
    site = parse_site(sae.cfg.site, n_layers=model.n_layers)
    d_model_site = site_d_in(model, site)
    if sae.d_in != d_model_site:
        raise ConfigError(
            f"SAE at site {site} has d_in={sae.d_in} but model {model.name!r} is {d_model_site} wide "
            f"there; the SAE was made for another model or site (its cfg says model "
            f"{sae.cfg.model_name or '?'!r})"
        )
    name = sae.cfg.model_name
    if name and _short_model_name(name) != _short_model_name(model.name):
        warnings.warn(
            f"SAE at {site} was made for model {name!r} but is evaluated on {model.name!r}",
            stacklevel=2,
        )
    return site


def _short_model_name(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def _named(saes: SAEs) -> dict[str, SAE]:
    if isinstance(saes, Mapping):
        named = dict(saes)
    else:
        named = {}
        for i, sae in enumerate(saes):
            named[f"{i}:{sae.cfg.site}.{sae.cfg.architecture}.w{sae.d_sae}"] = sae
    if not named:
        raise ConfigError("no SAEs to evaluate")
    return named


# ---------------------------------------------------------------------------------------------
# The core evaluation


def eval_token_ids(
    model: LanguageModel,
    n_tokens: int,
    corpus: str = "wiki",
    split: str = "heldout",
    context_len: int = 128,
) -> Tensor:
    """`[rows, context_len]` token ids of held-out text, packed with BOS first in each row, enough
    rows for about `n_tokens` non-special tokens (fewer if the split runs out)."""
    if n_tokens <= 0 or context_len < 2:
        raise ConfigError(f"need n_tokens > 0 and context_len >= 2, got {n_tokens} and {context_len}")
    docs = load_corpus(corpus, split=split)
    rows = math.ceil(n_tokens / (context_len - 1))
    token_ids: Tensor = pack(model.tokenizer, docs, context_len=context_len, max_rows=rows)
    return token_ids


def evaluate(
    model: LanguageModel,
    saes: SAEs,
    n_tokens: int = 8192,
    corpus: str = "wiki",
    split: str = "heldout",
    context_len: int = 128,
    batch_size: int = 4,
    min_tokens: int = MIN_EVAL_TOKENS,
) -> list[dict[str, Any]]:
    """Evaluate SAEs of one model on about `n_tokens` held-out tokens of `corpus`: one result per
    SAE, in SAEBench's core layout (see `evaluate_tokens`)."""
    token_ids = eval_token_ids(model, n_tokens, corpus, split, context_len)
    config = {"dataset": corpus, "split": split, "n_tokens_requested": n_tokens}
    return evaluate_tokens(
        model, saes, token_ids, batch_size=batch_size, min_tokens=min_tokens, eval_config=config
    )


def evaluate_tokens(
    model: LanguageModel,
    saes: SAEs,
    token_ids: Tensor,
    batch_size: int = 4,
    min_tokens: int = MIN_EVAL_TOKENS,
    eval_config: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate SAEs of one model on `token_ids [rows, pos]` (BOS first in each row).

    Per batch: one clean pass records the logits and every SAE's site; one pass per site with the
    activation zero-ablated; one pass per SAE with its reconstruction spliced in. Splices and
    ablations touch non-special positions only. Next-token metrics count a prediction when both
    the input token and its target are non-special. `batch_size` rows at a time: each pass holds
    `batch_size x pos x vocab` logits (vocab 262k for Gemma 3), so keep it small on CPU.

    Returns, per SAE, a dict with `sae_id`, `eval_type_id` "core", `eval_config`, `sae_cfg`,
    `eval_result_metrics` (SAEBench's groups and names plus a `gemmascope` group with `fvu`,
    `delta_lm_loss`, `frac_dead`, `frac_dense`), `density_histogram`, `fvu_by_position`, and
    `log10_density` (a `[d_sae]` tensor, not written to JSON)."""
    named = _named(saes)
    sites = {sae_id: sae_site(model, sae) for sae_id, sae in named.items()}
    unique_sites = sorted(set(sites.values()))
    if token_ids.ndim != 2 or token_ids.shape[1] < 2:
        raise ConfigError(f"token_ids must be [rows, pos] with pos >= 2, got shape {tuple(token_ids.shape)}")
    rows, context_len = token_ids.shape
    special = special_mask(token_ids, model.special_token_ids)
    n_eval = int((~special).sum())
    if n_eval < min_tokens:
        raise CorpusError(
            f"the evaluation set has {n_eval} non-special tokens ({rows} rows of {context_len}); "
            f"at least {min_tokens} are needed for the metrics to mean anything: "
            "ask for more tokens or use a larger held-out split"
        )

    device = model.device
    recon = {sae_id: ReconstructionStats(sae.d_sae, context_len) for sae_id, sae in named.items()}
    clean_stats = NextTokenStats()
    ablation_stats = {site: NextTokenStats() for site in unique_sites}
    sae_stats = {sae_id: NextTokenStats() for sae_id in named}
    n_batches = math.ceil(rows / batch_size)
    n_massive = 0
    passes = 1 + len(unique_sites) + len(named)

    with torch.no_grad():
        for start in tqdm(range(0, rows, batch_size), total=n_batches, desc="evaluating SAEs", unit="batch"):
            ids = token_ids[start : start + batch_size].to(device)
            keep = ~special[start : start + batch_size].to(device)  # [B, T] positions SAEs touch
            predict = keep[:, :-1] & keep[:, 1:]  # [B, T-1] predictions that count
            targets = ids[:, 1:][predict]

            acts, clean_logits = _clean_pass(model, ids, unique_sites)
            massive = _massive(acts, named, sites)  # [B, T] left out as BOS is (see norm_limit)
            n_massive += int((keep & massive).sum())
            keep = keep & ~massive
            predict = keep[:, :-1] & keep[:, 1:]
            targets = ids[:, 1:][predict]
            clean = CleanDistribution(clean_logits[:, :-1][predict])
            del clean_logits
            clean_stats.update(*clean.compare(clean.logits, targets))

            positions = torch.arange(ids.shape[1], device=device).expand_as(ids)[keep]
            for sae_id, sae in named.items():
                x = acts[sites[sae_id]][keep]
                f = sae.encode(x.to(_dtype(sae)))
                x_hat = sae.decode(f)
                recon[sae_id].update(x, x_hat, f, positions)

            for site in unique_sites:
                with zero_ablate(model, site, keep):
                    logits = _logits(model, ids, predict)
                ablation_stats[site].update(*clean.compare(logits, targets))
            for sae_id, sae in named.items():
                with splice_sae(model, sae, keep):
                    logits = _logits(model, ids, predict)
                sae_stats[sae_id].update(*clean.compare(logits, targets))
            del acts, clean, logits

    results = []
    for sae_id, sae in named.items():
        site = sites[sae_id]
        rec = recon[sae_id].metrics()
        abl, spliced = ablation_stats[site], sae_stats[sae_id]
        metrics = {
            "model_behavior_preservation": {
                "kl_div_score": kl_div_score(spliced.kl, abl.kl),
                "kl_div_with_ablation": abl.kl,
                "kl_div_with_sae": spliced.kl,
            },
            "model_performance_preservation": {
                "ce_loss_score": ce_loss_score(clean_stats.ce, spliced.ce, abl.ce),
                "ce_loss_with_ablation": abl.ce,
                "ce_loss_with_sae": spliced.ce,
                "ce_loss_without_sae": clean_stats.ce,
            },
            "reconstruction_quality": {k: rec[k] for k in ("explained_variance", "mse", "cossim")},
            "shrinkage": {
                k: rec[k] for k in ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias")
            },
            "sparsity": {"l0": rec["l0"], "l1": rec["l1"]},
            "token_stats": {
                "total_tokens_eval_reconstruction": clean_stats.n,
                "total_tokens_eval_sparsity_variance": n_eval - n_massive,
            },
            "misc_metrics": {
                k: rec[k] for k in ("freq_over_1_percent", "freq_over_10_percent", "frac_alive")
            },
            "gemmascope": {
                "fvu": rec["fvu"],
                "delta_lm_loss": spliced.ce - clean_stats.ce,
                "frac_dead": rec["frac_dead"],
                "frac_dense": rec["frac_dense"],
                "n_tokens": n_eval - n_massive,
                "n_massive_tokens_excluded": n_massive,
                "n_predictions": clean_stats.n,
            },
        }
        results.append(
            {
                "sae_id": sae_id,
                "eval_type_id": "core",
                "eval_config": {
                    "model_name": model.name,
                    "context_size": context_len,
                    "n_rows": rows,
                    "batch_size_prompts": batch_size,
                    "exclude_special_tokens_from_reconstruction": True,
                    "dense_density": DENSE_DENSITY,
                    "forward_passes_per_batch": passes,
                    **(eval_config or {}),
                },
                "sae_cfg": {
                    "architecture": sae.cfg.architecture,
                    "d_in": sae.d_in,
                    "d_sae": sae.d_sae,
                    "site": str(site),
                    "hook_name": site.hook_name,
                    "model_name": sae.cfg.model_name,
                },
                "eval_result_metrics": metrics,
                "density_histogram": rec["density_histogram"],
                "fvu_by_position": rec["fvu_by_position"],
                "log10_density": rec["log10_density"].clamp_min(1e-10).log10().float(),
            }
        )
    return results


def _massive(acts: Mapping[Site, Tensor], named: Mapping[str, SAE], sites: Mapping[str, Site]) -> Tensor:
    """`[B, T]` bool: positions where some SAE's input norm exceeds its `norm_limit`."""
    first = next(iter(acts.values()))
    out = torch.zeros(first.shape[:2], dtype=torch.bool, device=first.device)
    for sae_id, sae in named.items():
        limit = norm_limit(sae)
        if limit is not None:
            out |= acts[sites[sae_id]].norm(dim=-1) > limit
    return out


def _dtype(sae: SAE) -> torch.dtype:
    return sae.W_enc.dtype


def _clean_pass(
    model: LanguageModel, ids: Tensor, sites: Sequence[Site]
) -> tuple[dict[Site, Tensor], Tensor]:
    """One full forward pass: the logits `[B, T, vocab]` and each site's activation `[B, T, d]`."""
    acts: dict[Site, Tensor] = {}

    def recorder(site: Site) -> Callable[[Tensor], Tensor]:
        def record(act: Tensor) -> Tensor:
            acts[site] = act.detach()
            return act

        return record

    with ExitStack() as stack:
        for site in sites:
            stack.enter_context(edit_site(model, site, recorder(site)))
        logits = model.hf(input_ids=ids, use_cache=False).logits
    return acts, logits


@contextmanager
def replaced_at(
    model: LanguageModel, site: Site, replace: Callable[[Tensor], Tensor], keep: Tensor
) -> Iterator[None]:
    """Within the block, every forward pass over a batch shaped like `keep [B, T]` sees the
    activation at `site` replaced by `replace(act)` where `keep` is True and left clean elsewhere
    (BOS, EOS, pad)."""

    def edit(act: Tensor) -> Tensor:
        return torch.where(keep[..., None], replace(act), act)

    with edit_site(model, site, edit):
        yield


def splice_sae(model: LanguageModel, sae: SAE, keep: Tensor) -> AbstractContextManager[None]:
    """Within the block, the activation at the SAE's site is replaced by the SAE's reconstruction
    `x_hat` at the `keep [B, T]` positions (RECIPE 4: every non-special position)."""

    def reconstruct(act: Tensor) -> Tensor:
        return sae(act.to(_dtype(sae))).to(act.dtype)

    return replaced_at(model, sae_site(model, sae), reconstruct, keep)


def zero_ablate(model: LanguageModel, site: Site, keep: Tensor) -> AbstractContextManager[None]:
    """Within the block, the activation at `site` is replaced by zeros at the `keep [B, T]` positions."""
    return replaced_at(model, site, torch.zeros_like, keep)


def _logits(model: LanguageModel, ids: Tensor, predict: Tensor) -> Tensor:
    """Logits `[N, vocab]` of `ids [B, T]` at the counted prediction positions `predict [B, T-1]`."""
    logits: Tensor = model.hf(input_ids=ids, use_cache=False).logits
    return logits[:, :-1][predict]


# ---------------------------------------------------------------------------------------------
# Summaries, files and plots


def summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers of one result, flat: the columns of the CLI table and the plots."""
    m = result["eval_result_metrics"]
    out = {
        "sae_id": result["sae_id"],
        "site": result["sae_cfg"]["site"],
        "architecture": result["sae_cfg"]["architecture"],
        "d_sae": result["sae_cfg"]["d_sae"],
        "l0": m["sparsity"]["l0"],
        "fvu": m["gemmascope"]["fvu"],
        "delta_lm_loss": m["gemmascope"]["delta_lm_loss"],
        "ce_loss_score": m["model_performance_preservation"]["ce_loss_score"],
        "kl_div_with_sae": m["model_behavior_preservation"]["kl_div_with_sae"],
        "frac_dead": m["gemmascope"]["frac_dead"],
        "frac_dense": m["gemmascope"]["frac_dense"],
        "n_tokens": m["gemmascope"]["n_tokens"],
        "n_massive_tokens_excluded": m["gemmascope"].get("n_massive_tokens_excluded", 0),
    }
    probing = result.get("sparse_probing")
    if probing:
        out.update({k: v for k, v in probing["sae"].items() if k.startswith("sae_top_")})
    return out


def to_json(result: Mapping[str, Any]) -> dict[str, Any]:
    """A result without its tensors and with NaN / inf as None, ready for `json.dumps`."""

    def clean(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    return clean({k: v for k, v in result.items() if not isinstance(v, Tensor)})


def _write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_eval(folder: str | Path, result: Mapping[str, Any]) -> Path:
    """Write one SAE's result as `eval.json` in its folder (atomically); tensors are left out."""
    return _write_json(Path(folder) / "eval.json", to_json(result))


def write_report(
    run_dir: str | Path,
    results: Sequence[Mapping[str, Any]],
    probing: Mapping[str, Any] | None = None,
) -> Path:
    """Write `run_dir/report/`: `evals.json` (every result, a summary table and the probing
    results), `frontier_l0_delta_lm_loss.png`, `frontier_l0_fvu.png`, `density_histogram.png` and
    `fvu_by_position.png`. Returns the report folder."""
    report = Path(run_dir) / "report"
    report.mkdir(parents=True, exist_ok=True)
    plots = {
        "frontier_l0_delta_lm_loss": plot_frontier(
            results, "delta_lm_loss", report / "frontier_l0_delta_lm_loss.png"
        ),
        "frontier_l0_fvu": plot_frontier(results, "fvu", report / "frontier_l0_fvu.png"),
        "density_histogram": plot_density(results, report / "density_histogram.png"),
        "fvu_by_position": plot_position_error(results, report / "fvu_by_position.png"),
    }
    data = {
        "summary": [summary(r) for r in results],
        "results": [to_json(r) for r in results],
        "sparse_probing": to_json(probing) if probing else None,
        "plots": {k: p.name for k, p in plots.items()},
    }
    _write_json(report / "evals.json", data)
    return report


def _figure(width: float = 6.4, height: float = 4.4) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), dpi=110)


def _line_key(s: Mapping[str, Any]) -> str:
    return f"{s['site']} {s['architecture']} w{s['d_sae']}"


def plot_frontier(results: Sequence[Mapping[str, Any]], metric: str, path: str | Path) -> Path:
    """L0 (x, log scale) against `metric` ("delta_lm_loss" or "fvu"), one line per site,
    architecture and width, points sorted by L0. Writes a PNG."""
    labels = {"delta_lm_loss": "delta LM loss (nats)", "fvu": "FVU (1 - variance explained)"}
    if metric not in labels:
        raise ConfigError(f"unknown frontier metric {metric!r}: expected one of {sorted(labels)}")
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        s = summary(r)
        if _finite(s[metric]) and _finite(s["l0"]) and s["l0"] > 0:
            lines.setdefault(_line_key(s), []).append((s["l0"], s[metric]))
    fig = _figure()
    ax = fig.add_subplot()
    for key, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(labels[metric])
    ax.set_title(f"L0 vs {labels[metric]}")
    ax.grid(True, alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_density(results: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """The log10 latent density histogram of each SAE (step lines), dead latents in the legend."""
    fig = _figure()
    ax = fig.add_subplot()
    for r in results:
        h = r["density_histogram"]
        ax.stairs(h["counts"], h["log10_bin_edges"], label=f"{r['sae_id']} (dead {h['n_dead']})")
    ax.axvline(math.log10(DENSE_DENSITY), color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("log10 density (fraction of tokens a latent fires on)")
    ax.set_ylabel("latents")
    ax.set_title("Latent density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_position_error(results: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Reconstruction error by token position (in units of the mean variance per token)."""
    fig = _figure()
    ax = fig.add_subplot()
    for r in results:
        curve = r["fvu_by_position"]
        xs = [i for i, v in enumerate(curve) if v is not None]
        ax.plot(xs, [curve[i] for i in xs], linewidth=1, label=r["sae_id"])
    ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("FVU at position")
    ax.set_title("Reconstruction error by position")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """A compact text table of the headline numbers, one row per SAE."""
    rows = [summary(r) for r in results]
    ks = sorted({k for s in rows for k in s if k.startswith("sae_top_")}, key=_k_of)
    header = [
        "sae",
        "L0",
        "FVU",
        "dLM loss",
        "CE rec",
        "KL",
        "dead",
        "dense",
        *[f"top{_k_of(k)}" for k in ks],
    ]
    lines = [header]
    for s in rows:
        lines.append(
            [
                s["sae_id"],
                _fmt(s["l0"], 1),
                _fmt(s["fvu"], 4),
                _fmt(s["delta_lm_loss"], 4),
                _fmt(s["ce_loss_score"], 4),
                _fmt(s["kl_div_with_sae"], 4),
                _fmt(s["frac_dead"], 3),
                _fmt(s["frac_dense"], 3),
                *[_fmt(s.get(k), 3) for k in ks],
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in lines
    ]
    n = rows[0]["n_tokens"] if rows else 0
    massive = max((int(r.get("n_massive_tokens_excluded") or 0) for r in rows), default=0)
    left_out = f" and {massive} massive-activation tokens" if massive else ""
    return "\n".join(text) + f"\n({n} held-out tokens per SAE; BOS/EOS/pad{left_out} excluded)"


def _fmt(value: Any, digits: int) -> str:
    """A number with `digits` decimals; "-" for a missing or non-finite one (JSON has no NaN)."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


def _k_of(key: str) -> int:
    return int(key.split("_")[2])


# ---------------------------------------------------------------------------------------------
# Sparse probing (SAEBench style): one-vs-rest topic tasks on mean-pooled latents


@dataclass
class LogisticProbe:
    """Multinomial logistic regression on standardised features, fitted with L-BFGS and an L2
    penalty `l2 / (2 n) * ||W||^2` (the scale of scikit-learn's `C = 1 / l2`)."""

    weight: Tensor  # [d, classes]
    bias: Tensor  # [classes]
    mean: Tensor  # [d]
    std: Tensor  # [d]

    @classmethod
    def fit(
        cls, x: Tensor, y: Tensor, n_classes: int | None = None, l2: float = 1.0, max_iter: int = 200
    ) -> LogisticProbe:
        """Fit on `x [n, d]` with labels `y [n]` in 0..n_classes-1."""
        x = x.double()
        n_classes = n_classes or int(y.max()) + 1
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
        z = (x - mean) / std
        weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z @ weight + bias, y)
            loss = loss + l2 / (2 * x.shape[0]) * weight.pow(2).sum()
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        # Tiny tensors: thread hand-offs cost more than the arithmetic (20x here on a busy CPU).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.enable_grad():
                opt.step(closure)  # type: ignore[no-untyped-call]
        finally:
            torch.set_num_threads(threads)
        return cls(weight.detach(), bias.detach(), mean, std)

    def predict(self, x: Tensor) -> Tensor:
        """`[n, d] -> [n]` predicted class."""
        z = (x.double() - self.mean) / self.std
        return (z @ self.weight + self.bias).argmax(-1)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return float((self.predict(x) == y).double().mean())


def top_k_by_mean_difference(x: Tensor, y: Tensor, k: int) -> Tensor:
    """Indices `[k]` of the features of `x [n, d]` whose class means (binary labels `y [n]`) differ
    most in absolute value."""
    diff = x[y == 1].mean(0) - x[y == 0].mean(0)
    return diff.abs().topk(min(k, x.shape[1])).indices


def probe_accuracies(
    x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, ks: Sequence[int], prefix: str
) -> dict[str, float]:
    """Test accuracy of a probe on all features (`{prefix}_test_accuracy`) and on the top-k by class-
    mean difference on the training set (`{prefix}_top_{k}_test_accuracy`)."""
    out = {f"{prefix}_test_accuracy": LogisticProbe.fit(x_train, y_train, 2).accuracy(x_test, y_test)}
    for k in ks:
        idx = top_k_by_mean_difference(x_train, y_train, k)
        probe = LogisticProbe.fit(x_train[:, idx], y_train, 2)
        out[f"{prefix}_top_{k}_test_accuracy"] = probe.accuracy(x_test[:, idx], y_test)
    return out


def _tokenize_articles(model: LanguageModel, texts: Sequence[str], context_len: int) -> list[list[int]]:
    bos = model.tokenizer.bos_token_id
    encoded = model.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [[bos, *ids[: context_len - 1]] for ids in encoded]


def pooled_activations(
    model: LanguageModel,
    saes: Mapping[str, SAE],
    texts: Sequence[str],
    context_len: int = 128,
    batch_size: int = 8,
) -> tuple[dict[Site, Tensor], dict[str, Tensor]]:
    """Mean over each text's non-special tokens (first `context_len` tokens, BOS first) of the
    activation at every SAE's site, `{site: [n_texts, d_in]}`, and of every SAE's latents,
    `{sae_id: [n_texts, d_sae]}`. One forward pass per batch serves all SAEs; it stops after the
    deepest site."""
    sites = {sae_id: sae_site(model, sae) for sae_id, sae in saes.items()}
    unique_sites = sorted(set(sites.values()))
    tokens = _tokenize_articles(model, texts, context_len)
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    raw: dict[Site, list[Tensor]] = {site: [] for site in unique_sites}
    latents: dict[str, list[Tensor]] = {sae_id: [] for sae_id in saes}
    device = model.device
    n_batches = math.ceil(len(tokens) / batch_size)
    for start in tqdm(
        range(0, len(tokens), batch_size), total=n_batches, desc="probing: pooling", unit="batch"
    ):
        chunk = tokens[start : start + batch_size]
        width = max(len(t) for t in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, t in enumerate(chunk):
            ids[i, : len(t)] = torch.tensor(t)
            attention[i, : len(t)] = 1
        ids, attention = ids.to(device), attention.to(device)
        keep = (attention.bool() & ~special_mask(ids, model.special_token_ids)).unsqueeze(-1)  # [B, T, 1]
        count = keep.sum(1).clamp_min(1)  # [B, 1]
        with torch.no_grad():
            acts = capture(model, ids, unique_sites, attention_mask=attention)
            for site in unique_sites:
                raw[site].append(((acts[site].float() * keep).sum(1) / count).cpu())
            for sae_id, sae in saes.items():
                f = sae.encode(acts[sites[sae_id]].to(_dtype(sae)))
                latents[sae_id].append(((f.float() * keep).sum(1) / count).cpu())
    return (
        {site: torch.cat(v) for site, v in raw.items()},
        {sae_id: torch.cat(v) for sae_id, v in latents.items()},
    )


def _probe_articles(
    corpus: str, split: str, n_per_class: int, min_per_class: int, seed: int
) -> tuple[list[str], list[str], list[str]]:
    """Up to `n_per_class` article texts of each topic with at least `min_per_class` articles."""
    docs = load_corpus(corpus, split=split)
    by_topic: dict[str, list[str]] = {}
    for doc in docs:
        topic = (doc.topic or "").strip()
        if topic.lower() not in _NO_TOPIC and doc.text.strip():
            by_topic.setdefault(topic, []).append(doc.text)
    rng = random.Random(seed)
    classes = sorted(t for t, texts in by_topic.items() if len(texts) >= min_per_class)
    if len(classes) < 2:
        counts = {t: len(v) for t, v in sorted(by_topic.items())}
        raise CorpusError(
            f"sparse probing needs at least 2 topics with >= {min_per_class} articles in the "
            f"{split!r} split of corpus {corpus!r}; found {counts}"
        )
    texts, labels = [], []
    for topic in classes:
        chosen = rng.sample(by_topic[topic], min(n_per_class, len(by_topic[topic])))
        texts += chosen
        labels += [topic] * len(chosen)
    return texts, labels, classes


def sparse_probing(
    model: LanguageModel,
    saes: SAEs,
    corpus: str = "wiki",
    split: str = "heldout",
    n_per_class: int = 50,
    ks: Sequence[int] = PROBE_KS,
    context_len: int = 128,
    test_fraction: float = 0.3,
    min_per_class: int = 10,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """SAEBench-style sparse probing on the corpus's topic labels. Up to `n_per_class` articles of
    each topic are mean-pooled (latents and raw activations); for each topic a class-balanced
    one-vs-rest task (its articles against as many drawn from the other topics) is split into
    train and test; the top-k latents by class-mean difference on train feed a logistic
    regression for each k, and a probe on the raw activations at the same site is the baseline.

    Returns `{"eval_type_id": "sparse_probing", "eval_config", "classes", "llm": {site: {...}},
    "saes": {sae_id: {"llm": {...}, "sae": {...}}}}` with accuracies averaged over topics under
    SAEBench's names (`llm_test_accuracy`, `llm_top_{k}_test_accuracy`, `sae_test_accuracy`,
    `sae_top_{k}_test_accuracy`)."""
    named = _named(saes)
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    texts, labels, classes = _probe_articles(corpus, split, n_per_class, min_per_class, seed)
    raw, latents = pooled_activations(model, named, texts, context_len, batch_size)
    sites = {sae_id: sae_site(model, sae) for sae_id, sae in named.items()}

    gen = torch.Generator().manual_seed(seed)
    label_idx = torch.tensor([classes.index(t) for t in labels])
    tasks = []  # (class, train indices, train labels, test indices, test labels)
    for c, topic in enumerate(classes):
        pos = torch.nonzero(label_idx == c).flatten()
        neg = torch.nonzero(label_idx != c).flatten()
        n = min(len(pos), len(neg))  # balanced: as many negatives as positives
        pos = pos[torch.randperm(len(pos), generator=gen)[:n]]
        neg = neg[torch.randperm(len(neg), generator=gen)[:n]]
        n_test = min(n - 1, max(1, round(test_fraction * n)))
        train = torch.cat([pos[n_test:], neg[n_test:]])
        test = torch.cat([pos[:n_test], neg[:n_test]])
        y_train = torch.cat([torch.ones(n - n_test), torch.zeros(n - n_test)]).long()
        y_test = torch.cat([torch.ones(n_test), torch.zeros(n_test)]).long()
        tasks.append((topic, train, y_train, test, y_test))

    def run(features: Tensor, prefix: str) -> dict[str, Any]:
        per_class = {
            topic: probe_accuracies(features[tr], ytr, features[te], yte, ks, prefix)
            for topic, tr, ytr, te, yte in tasks
        }
        keys = next(iter(per_class.values())).keys()
        mean = {k: sum(pc[k] for pc in per_class.values()) / len(per_class) for k in keys}
        return {**mean, "per_class": per_class}

    llm = {str(site): run(x, "llm") for site, x in tqdm(raw.items(), desc="probing: raw activations")}
    per_sae = {
        sae_id: {"llm": llm[str(sites[sae_id])], "sae": run(latents[sae_id], "sae")}
        for sae_id in tqdm(named, desc="probing: SAEs")
    }
    return {
        "eval_type_id": "sparse_probing",
        "eval_config": {
            "model_name": model.name,
            "dataset": corpus,
            "split": split,
            "n_per_class": n_per_class,
            "k_values": list(ks),
            "context_length": context_len,
            "test_fraction": test_fraction,
            "seed": seed,
            "n_articles": len(texts),
            "n_test_per_task": {topic: len(te) for topic, _, _, te, _ in tasks},
        },
        "classes": classes,
        "llm": llm,
        "saes": per_sae,
    }


def attach_probing(results: Sequence[dict[str, Any]], probing: Mapping[str, Any]) -> None:
    """Put each SAE's probing accuracies (without the per-class detail) into its core result
    under `sparse_probing`, so `eval.json` and the table carry them."""
    for r in results:
        entry = probing["saes"].get(r["sae_id"])
        if entry:
            r["sparse_probing"] = {
                group: {k: v for k, v in entry[group].items() if k != "per_class"} for group in ("llm", "sae")
            }


def probing_table(probing: Mapping[str, Any]) -> str:
    """A compact text table: test accuracy at each k and with all features, per site and SAE."""
    ks = probing["eval_config"]["k_values"]
    header = ["probe on", *[f"top{k}" for k in ks], "all"]
    lines = [header]
    for site, acc in probing["llm"].items():
        lines.append(
            [
                f"{site} raw activations",
                *[f"{acc[f'llm_top_{k}_test_accuracy']:.3f}" for k in ks],
                f"{acc['llm_test_accuracy']:.3f}",
            ]
        )
    for sae_id, entry in probing["saes"].items():
        acc = entry["sae"]
        lines.append(
            [
                sae_id,
                *[f"{acc[f'sae_top_{k}_test_accuracy']:.3f}" for k in ks],
                f"{acc['sae_test_accuracy']:.3f}",
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in lines
    ]
    cfg = probing["eval_config"]
    return "\n".join(text) + (
        f"\n(sparse probing: {len(probing['classes'])} one-vs-rest topic tasks, {cfg['n_articles']} "
        f"{cfg['split']} articles, test accuracy averaged over topics)"
    )
