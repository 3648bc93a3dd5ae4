"""The core evaluation of SAEs, the Gemma Scope / SAEBench "core" way (RECIPE.md section 4): the
forward passes that produce L0, FVU, delta LM loss, CE loss recovered against zero-ablation,
KL(clean || spliced), dead/dense fractions and the health block (their arithmetic lives in
metrics.py), the held-out token rows, and the splice of a reconstruction (or zeros) into the real
forward pass. The site check and the latents come from `sae.sae_site` and `sae.encode_inputs`; the
batches and the clean pass (logits and every site) from `sites.capture_batches`.

Every metric is taken over non-special tokens only (BOS, EOS and pad excluded), on held-out text.
The clean forward pass and the activations at every SAE's site come from one pass; the zero-ablation
pass is one per site and the spliced pass one per SAE (they differ by construction).

Knows nothing of tables, plots or files (report.py), of probing (probing.py), of the server, of
training, or of how SAE files are laid out (formats.py does that).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gemmascope.corpus import DEFAULT_CORPUS, special_mask, token_rows
from gemmascope.errors import ConfigError, CorpusError, SiteError
from gemmascope.evals.metrics import (
    DENSE_DENSITY,
    CleanDistribution,
    NextTokenStats,
    ReconstructionStats,
    ce_loss_score,
    kl_div_score,
)
from gemmascope.models import LanguageModel
from gemmascope.sae import SAE, encode_inputs, massive_mask, sae_site
from gemmascope.sites import CapturedBatch, Site, capture_batches, edit_from, edit_site, parse_site

MIN_EVAL_TOKENS = 1024  # fewer non-special tokens than this and dead/dense/CE numbers mean little
SAEs = Mapping[str, SAE] | Sequence[SAE]

# ---------------------------------------------------------------------------------------------
# Checking what is asked


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
    corpus: str = DEFAULT_CORPUS,
    split: str = "heldout",
    context_len: int = 128,
) -> Tensor:
    """`[rows, context_len]` token ids of held-out text (`corpus.token_rows`), BOS first in each
    row, enough rows for about `n_tokens` tokens after BOS (fewer if the split runs out)."""
    return token_rows(model.tokenizer, n_tokens, corpus, split, context_len, count_bos=False, exact=False)


def evaluate(
    model: LanguageModel,
    saes: SAEs,
    n_tokens: int = 8192,
    corpus: str = DEFAULT_CORPUS,
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


def evaluate_replacement(
    model: LanguageModel,
    transcoders: Sequence[SAE],
    n_tokens: int = 8192,
    corpus: str = DEFAULT_CORPUS,
    context_len: int = 128,
    batch_size: int = 4,
    min_tokens: int = MIN_EVAL_TOKENS,
) -> dict[str, Any]:
    """The replacement model's loss: every transcoder of `transcoders` (one per layer, at most)
    replaces its layer's MLP output at once (`splice_transcoders`), on about `n_tokens` held-out
    tokens. Returns `layers`, `ce_loss_without`, `ce_loss_with`, `delta_lm_loss`, `kl_div` and
    `n_predictions` (predictions whose input and target are non-special)."""
    layers = [written_site(model, tc).layer for tc in transcoders]
    if not transcoders or not all(tc.is_transcoder for tc in transcoders):
        raise ConfigError("the replacement model needs transcoders (SAEs with an output site), one per layer")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"the replacement model takes one transcoder per layer; layers given: {layers}")
    token_ids = eval_token_ids(model, n_tokens, corpus, "heldout", context_len)
    special = _special_positions(model, token_ids, min_tokens)
    clean_stats, replaced_stats = NextTokenStats(), NextTokenStats()
    with torch.no_grad():
        for start in range(0, token_ids.shape[0], batch_size):
            ids = token_ids[start : start + batch_size].to(model.device)
            keep = ~special[start : start + batch_size].to(model.device)
            predict = keep[:, :-1] & keep[:, 1:]
            targets = ids[:, 1:][predict]
            clean = CleanDistribution(_logits(model, ids, predict))
            clean_stats.update(*clean.compare(clean.logits, targets))
            with splice_transcoders(model, transcoders, keep):
                replaced_stats.update(*clean.compare(_logits(model, ids, predict), targets))
    return {
        "layers": sorted(layers),
        "ce_loss_without": clean_stats.ce,
        "ce_loss_with": replaced_stats.ce,
        "delta_lm_loss": replaced_stats.ce - clean_stats.ce,
        "kl_div": replaced_stats.kl,
        "n_predictions": clean_stats.n,
    }


@dataclass
class _Accumulators:
    """The running sums of one evaluation: per SAE, per site and for the clean pass."""

    recon: dict[str, ReconstructionStats]
    clean: NextTokenStats
    ablation: dict[Site, NextTokenStats]
    spliced: dict[str, NextTokenStats]
    n_massive: int = 0


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
    `delta_lm_loss`, `frac_dead`, `frac_dense`), `health` (see `health`), `density_histogram`,
    `fvu_by_position`, and `log10_density` (a `[d_sae]` tensor, not written to JSON).

    A transcoder is measured on what it replaces: FVU of its output site (the MLP's output) against
    its prediction from its input site, ΔLM loss with the MLP's output replaced by that prediction,
    CE recovered against zero-ablating the MLP's output."""
    named = _named(saes)
    sites = {sae_id: sae_site(model, sae) for sae_id, sae in named.items()}
    writes = {sae_id: written_site(model, sae) for sae_id, sae in named.items()}
    unique_sites = sorted(set(sites.values()) | set(writes.values()))
    special = _special_positions(model, token_ids, min_tokens)
    rows, context_len = token_ids.shape
    acc = _Accumulators(
        recon={sae_id: ReconstructionStats(sae.d_sae, context_len) for sae_id, sae in named.items()},
        clean=NextTokenStats(),
        ablation={site: NextTokenStats() for site in sorted(set(writes.values()))},
        spliced={sae_id: NextTokenStats() for sae_id in named},
    )
    batches = capture_batches(
        model, token_ids, unique_sites, batch_size, logits=True, desc="evaluating SAEs", progress=True
    )
    with torch.no_grad():
        for batch in batches:  # the clean pass: logits and every site
            keep = ~special[batch.start : batch.stop].to(model.device)  # [B, T] non-special positions
            _evaluate_batch(model, named, sites, writes, batch, keep, acc)

    config = {
        "model_name": model.name,
        "context_size": context_len,
        "n_rows": rows,
        "batch_size_prompts": batch_size,
        "exclude_special_tokens_from_reconstruction": True,
        "dense_density": DENSE_DENSITY,
        "forward_passes_per_batch": 1 + len(acc.ablation) + len(named),
        **(eval_config or {}),
    }
    n_tokens = int((~special).sum()) - acc.n_massive
    return [
        _core_result(sae_id, sae, sites[sae_id], writes[sae_id], acc, n_tokens, config)
        for sae_id, sae in named.items()
    ]


def written_site(model: LanguageModel, sae: SAE) -> Site:
    """The site an SAE's output stands for: its own, or a transcoder's output site, checked
    against the model (`sae.sae_site` checks the input site)."""
    if not sae.is_transcoder:
        return sae_site(model, sae)
    try:
        return parse_site(sae.cfg.out_site, model.n_layers)
    except ConfigError as err:
        raise SiteError(
            f"model {model.name!r} has no output site {sae.cfg.out_site!r} for a transcoder: {err}"
        ) from err


def _special_positions(model: LanguageModel, token_ids: Tensor, min_tokens: int) -> Tensor:
    """`[rows, pos]` bool: BOS, EOS and pad positions of `token_ids`, checked to leave at least
    `min_tokens` others."""
    if token_ids.ndim != 2 or token_ids.shape[1] < 2:
        raise ConfigError(f"token_ids must be [rows, pos] with pos >= 2, got shape {tuple(token_ids.shape)}")
    rows, context_len = token_ids.shape
    special: Tensor = special_mask(token_ids, model.special_token_ids)
    n_eval = int((~special).sum())
    if n_eval < min_tokens:
        raise CorpusError(
            f"the evaluation set has {n_eval} non-special tokens ({rows} rows of {context_len}); "
            f"at least {min_tokens} are needed for the metrics to mean anything: "
            "ask for more tokens or use a larger held-out split"
        )
    return special


def _evaluate_batch(
    model: LanguageModel,
    named: Mapping[str, SAE],
    sites: Mapping[str, Site],
    writes: Mapping[str, Site],
    batch: CapturedBatch,
    keep: Tensor,
    acc: _Accumulators,
) -> None:
    """Add one batch to `acc`: its clean pass (logits and every site, captured), every SAE's
    reconstruction, one zero-ablated pass per site and one spliced pass per SAE. `keep [B, T]` marks
    the non-special positions; massive-activation positions are dropped from it here."""
    ids, acts, clean_logits = batch.ids, batch.acts, batch.logits
    batch.acts, batch.logits = {}, None  # the logits are B x T x vocab: freed once used below
    assert clean_logits is not None
    massive = _massive(acts, named, sites)  # [B, T] left out as BOS is (see sae.massive_mask)
    acc.n_massive += int((keep & massive).sum())
    keep = keep & ~massive  # [B, T] positions SAEs touch
    predict = keep[:, :-1] & keep[:, 1:]  # [B, T-1] predictions that count
    targets = ids[:, 1:][predict]
    clean = CleanDistribution(clean_logits[:, :-1][predict])
    del clean_logits
    acc.clean.update(*clean.compare(clean.logits, targets))

    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)[keep]
    for sae_id, sae in named.items():
        x = acts[sites[sae_id]][keep]
        f = encode_inputs(sae, x)  # none of these positions is massive: keep excludes them
        target = acts[writes[sae_id]][keep].to(f.dtype)  # x itself, or a transcoder's MLP output
        acc.recon[sae_id].update(target, sae.decode(f) + sae.skip(x.to(f.dtype)), f, positions)
    del acts

    for site, stats in acc.ablation.items():
        with zero_ablate(model, site, keep):
            logits = _logits(model, ids, predict)
        stats.update(*clean.compare(logits, targets))
    for sae_id, sae in named.items():
        with splice_sae(model, sae, keep):
            logits = _logits(model, ids, predict)
        acc.spliced[sae_id].update(*clean.compare(logits, targets))


def _core_result(
    sae_id: str,
    sae: SAE,
    site: Site,
    written: Site,
    acc: _Accumulators,
    n_tokens: int,
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """One SAE's result in SAEBench's core layout (see `evaluate_tokens`)."""
    rec = acc.recon[sae_id].metrics()
    clean, abl, spliced = acc.clean, acc.ablation[written], acc.spliced[sae_id]
    metrics = {
        "model_behavior_preservation": {
            "kl_div_score": kl_div_score(spliced.kl, abl.kl),
            "kl_div_with_ablation": abl.kl,
            "kl_div_with_sae": spliced.kl,
        },
        "model_performance_preservation": {
            "ce_loss_score": ce_loss_score(clean.ce, spliced.ce, abl.ce),
            "ce_loss_with_ablation": abl.ce,
            "ce_loss_with_sae": spliced.ce,
            "ce_loss_without_sae": clean.ce,
        },
        "reconstruction_quality": {k: rec[k] for k in ("explained_variance", "mse", "cossim")},
        "shrinkage": {
            k: rec[k] for k in ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias")
        },
        "sparsity": {"l0": rec["l0"], "l1": rec["l1"]},
        "token_stats": {
            "total_tokens_eval_reconstruction": clean.n,
            "total_tokens_eval_sparsity_variance": n_tokens,
        },
        "misc_metrics": {k: rec[k] for k in ("freq_over_1_percent", "freq_over_10_percent", "frac_alive")},
        "gemmascope": {
            "fvu": rec["fvu"],
            "delta_lm_loss": spliced.ce - clean.ce,
            "frac_dead": rec["frac_dead"],
            "frac_dense": rec["frac_dense"],
            "n_tokens": n_tokens,
            "n_massive_tokens_excluded": acc.n_massive,
            "n_predictions": clean.n,
        },
    }
    return {
        "sae_id": sae_id,
        "eval_type_id": "core",
        "eval_config": dict(config),
        "sae_cfg": {
            "architecture": sae.cfg.architecture,
            "d_in": sae.d_in,
            "d_sae": sae.d_sae,
            "site": str(site),
            "hook_name": site.hook_name,
            "model_name": sae.cfg.model_name,
            **({"out_site": str(written), "affine_skip": sae.cfg.affine_skip} if sae.is_transcoder else {}),
        },
        "eval_result_metrics": metrics,
        "health": rec["health"],
        "density_histogram": rec["density_histogram"],
        "fvu_by_position": rec["fvu_by_position"],
        "log10_density": rec["log10_density"].clamp_min(1e-10).log10().float(),
    }


def _massive(acts: Mapping[Site, Tensor], named: Mapping[str, SAE], sites: Mapping[str, Site]) -> Tensor:
    """`[B, T]` bool: positions where some SAE's input is massive (`sae.massive_mask`)."""
    first = next(iter(acts.values()))
    out = torch.zeros(first.shape[:2], dtype=torch.bool, device=first.device)
    for sae_id, sae in named.items():
        out |= massive_mask(sae, acts[sites[sae_id]])
    return out


def _dtype(sae: SAE) -> torch.dtype:
    return sae.W_enc.dtype


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
    `x_hat` at the `keep [B, T]` positions (RECIPE 4: every non-special position); a transcoder's
    output site by its prediction (`splice_transcoders`)."""
    if sae.is_transcoder:
        return splice_transcoders(model, [sae], keep)

    def reconstruct(act: Tensor) -> Tensor:
        return sae(act.to(_dtype(sae))).to(act.dtype)

    return replaced_at(model, sae_site(model, sae), reconstruct, keep)


@contextmanager
def splice_transcoders(model: LanguageModel, transcoders: Sequence[SAE], keep: Tensor) -> Iterator[None]:
    """Within the block, every transcoder's output site (its layer's MLP output) is replaced by its
    prediction from its input site in the same pass, at the `keep [B, T]` positions: with one
    transcoder per layer, the replacement model of attribution graphs (MLPs replaced, attention
    and norms as they are)."""
    with ExitStack() as stack:
        for tc in transcoders:

            def predict(x: Tensor, act: Tensor, tc: SAE = tc) -> Tensor:
                return torch.where(keep[..., None], tc(x.to(_dtype(tc))).to(act.dtype), act)

            stack.enter_context(edit_from(model, sae_site(model, tc), written_site(model, tc), predict))
        yield


def zero_ablate(model: LanguageModel, site: Site, keep: Tensor) -> AbstractContextManager[None]:
    """Within the block, the activation at `site` is replaced by zeros at the `keep [B, T]` positions."""
    return replaced_at(model, site, torch.zeros_like, keep)


def _logits(model: LanguageModel, ids: Tensor, predict: Tensor) -> Tensor:
    """Logits `[N, vocab]` of `ids [B, T]` at the counted prediction positions `predict [B, T-1]`."""
    logits: Tensor = model.hf(input_ids=ids, use_cache=False).logits
    return logits[:, :-1][predict]


# ---------------------------------------------------------------------------------------------
# Summaries, files and plots
