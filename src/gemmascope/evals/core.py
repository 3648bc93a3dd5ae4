"""The core evaluation of SAEs, the Gemma Scope / SAEBench "core" way (RECIPE.md section 4): the
forward passes that produce L0, FVU, delta LM loss, CE loss recovered against zero-ablation,
KL(clean || spliced), dead/dense fractions and the health block (their arithmetic lives in
metrics.py), the held-out token rows, and the splice of a reconstruction (or zeros) into the real
forward pass. The site check and the latents come from `sae.sae_site` and `sae.encode_inputs`; the
batches and the clean pass (every site, every layer's output, the final hidden states) from
`sites.capture_batches`.

Every metric is taken over non-special tokens only (BOS, EOS and pad excluded), on held-out text.
The clean forward pass and the activations at every SAE's site come from one pass; the zero-ablation
pass is one per site and the spliced pass one per SAE (they differ by construction).

`edited_batches` is the one way to measure the model under an edit (a splice, an ablation, a steer,
a fine-tune's splice with gradients): held-out rows in batches, one clean pass each (sites and the
trunk, `sites.capture_batches`), the one mask of positions an edit may touch (not BOS/EOS/pad, not
a massive input of any SAE measured), the counted predictions and the clean distribution to
compare an edited pass with. What makes it fast, with the same figures as whole forward passes
(to float rounding, tested to 1e-4): an edited pass resumes from the clean pass after the layers no
edit touches (`sites.resume`), and takes the output layer only at the counted predictions and a
vocabulary block at a time (`metrics.CleanDistribution`), never holding `[B, T, vocab]` logits. `splice` is the one splice of SAEs and transcoders. The core
evaluation, the replacement model, `effects.side_effects` and `train.finetune` use both.

Knows nothing of tables, plots or files (report.py), of probing (probing.py), of the server, of
training, or of how SAE files are laid out (formats/ does that).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
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
from gemmascope.models import LanguageModel, output_head
from gemmascope.sae import SAE, encode_inputs, massive_mask, sae_site
from gemmascope.sites import Site, Trunk, capture_batches, edit_from, edit_site, parse_site, resume

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


@dataclass
class EditBatch:
    """One batch of `edited_batches`: rows `start:stop` of the token rows, their `ids [B, T]`, the
    clean pass's activations `acts` at the sites asked for (`[B, T, d]` each) and its `trunk` (every
    layer's output, what an edited pass resumes from), `keep [B, T]` the positions an edit may
    touch (not special, no massive input), `predict [B, T-1]` the predictions that count (input and
    target kept), their `targets [N]`, the clean next-token distribution there, `unedited` (the clean
    pass's own cross-entropy and KL, `[N]` each) and `n_massive` (non-special positions left out for
    a massive input)."""

    model: LanguageModel
    start: int
    stop: int
    ids: Tensor
    acts: dict[Site, Tensor]
    trunk: Trunk
    keep: Tensor
    predict: Tensor
    targets: Tensor
    clean: CleanDistribution
    unedited: tuple[Tensor, Tensor]
    n_massive: int

    def hidden(self) -> Tensor:
        """`[N, d]`: the final hidden states (what the output layer reads) on this batch at the
        counted predictions, under whatever edit is in place (`sites.resume`: the layers before the
        first one an edit touches are the clean pass's; differentiable in an SAE spliced in when
        gradients are on)."""
        h: Tensor = resume(self.model, self.ids, self.trunk)
        return h[:, :-1][self.predict]

    def under(self, edit: AbstractContextManager[Any]) -> tuple[Tensor, Tensor]:
        """Cross-entropy and KL(clean ‖ edited), `[N]` each, of the pass with `edit` in place."""
        with edit:
            hidden = self.hidden()
        return self.clean.compare(hidden)


def edited_batches(
    model: LanguageModel,
    token_ids: Tensor,
    saes: Sequence[SAE] = (),
    batch_rows: int = 4,
    *,
    sites: Sequence[Site] = (),
    start: int = 0,
    min_tokens: int = MIN_EVAL_TOKENS,
    desc: str | None = None,
    progress: bool = False,
) -> Generator[EditBatch, None, None]:
    """The one way to measure the model under an edit: `token_ids [rows, T]` (BOS first in each
    row) from row `start` on, `batch_rows` rows per clean pass (`sites.capture_batches` up to the
    output layer, at every SAE's input site and at `sites`), each batch an `EditBatch` whose `keep`
    is the one mask: not BOS/EOS/pad and, for every SAE of `saes`, not a massive input
    (`sae.massive_mask`). A CorpusError when the rows hold fewer than `min_tokens` non-special
    tokens. Logits are never held whole: the clean distribution keeps `[N, vocab]` probabilities
    (262k vocab for Gemma 3) and each pass takes the output layer a block at a time."""
    special = _special_positions(model, token_ids, min_tokens)
    head = output_head(model)
    reads = [sae_site(model, sae) for sae in saes]
    capture_sites = sorted(set(reads) | set(sites))
    batches = capture_batches(
        model, token_ids, capture_sites, batch_rows, start=start, trunk=True, desc=desc, progress=progress
    )
    for batch in batches:
        ids, acts, trunk = batch.ids, batch.acts, batch.trunk
        assert trunk is not None
        keep = ~special[batch.start : batch.stop].to(ids.device)  # [B, T] non-special positions
        massive = torch.zeros_like(keep)  # [B, T] left out as BOS is (see sae.massive_mask)
        for sae, site in zip(saes, reads, strict=True):
            massive |= massive_mask(sae, acts[site])
        n_massive = int((keep & massive).sum())
        keep = keep & ~massive
        predict = keep[:, :-1] & keep[:, 1:]  # [B, T-1] predictions that count
        targets = ids[:, 1:][predict]
        clean = CleanDistribution(head, trunk.final[:, :-1][predict], targets)
        yield EditBatch(
            model, batch.start, batch.stop, ids, acts, trunk, keep, predict, targets, clean,
            clean.unedited(), n_massive,
        )  # fmt: skip


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

    Per batch (`edited_batches`): one clean pass records the logits and every SAE's site; one pass
    per site with the activation zero-ablated; one pass per SAE with its reconstruction spliced in.
    Splices and ablations touch the kept positions only (not special, no SAE's input massive), and
    next-token metrics count a prediction when both the input token and its target are kept.
    `batch_size` rows at a time: each pass holds `batch_size x pos x vocab` logits (vocab 262k for
    Gemma 3), so keep it small on CPU.

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
    rows, context_len = token_ids.shape
    acc = _Accumulators(
        recon={sae_id: ReconstructionStats(sae.d_sae, context_len) for sae_id, sae in named.items()},
        clean=NextTokenStats(),
        ablation={site: NextTokenStats() for site in sorted(set(writes.values()))},
        spliced={sae_id: NextTokenStats() for sae_id in named},
    )
    batches = edited_batches(
        model, token_ids, list(named.values()), batch_size, sites=list(writes.values()),
        min_tokens=min_tokens, desc="evaluating SAEs", progress=True,
    )  # fmt: skip
    with torch.no_grad():
        for batch in batches:
            _evaluate_batch(model, named, sites, writes, batch, acc)

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
    n_tokens = int((~special_mask(token_ids, model.special_token_ids)).sum()) - acc.n_massive
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
    batch: EditBatch,
    acc: _Accumulators,
) -> None:
    """Add one batch to `acc`: its clean pass, every SAE's reconstruction at the kept positions,
    one zero-ablated pass per site and one spliced pass per SAE."""
    keep, acts = batch.keep, batch.acts
    acc.n_massive += batch.n_massive
    acc.clean.update(*batch.unedited)
    ids = batch.ids
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)[keep]
    for sae_id, sae in named.items():
        x = acts[sites[sae_id]][keep]
        f = encode_inputs(sae, x)  # none of these positions is massive: keep excludes them
        target = acts[writes[sae_id]][keep].to(f.dtype)  # x itself, or a transcoder's MLP output
        acc.recon[sae_id].update(target, sae.decode(f) + sae.skip(x.to(f.dtype)), f, positions)
    batch.acts = {}
    del acts

    for site, stats in acc.ablation.items():
        stats.update(*batch.under(zero_ablate(model, site, keep)))
    for sae_id, sae in named.items():
        acc.spliced[sae_id].update(*batch.under(splice(model, [sae], keep)))


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


Record = Callable[[SAE, Tensor, Tensor], None]


@contextmanager
def splice(
    model: LanguageModel, saes: Sequence[SAE], keep: Tensor, record: Record | None = None
) -> Iterator[None]:
    """The one splice. Within the block, at the `keep [B, T]` positions (RECIPE 4: every position
    `edited_batches` keeps), each SAE's reconstruction replaces the activation at its site, and
    each transcoder's prediction from its input site, in the same pass, replaces the activation at
    its output site (its layer's MLP output; with one transcoder per layer, the replacement model
    of attribution graphs: MLPs replaced, attention and norms as they are). Elsewhere the model's
    own activation stays. With `record`, every pass calls `record(sae, target [N, d], prediction
    [N, d])` at the kept positions, in the SAE's dtype (the activation it replaces and what
    replaces it; differentiable in the SAE's weights when gradients are on)."""
    with ExitStack() as stack:
        for sae in saes:

            def predict(x: Tensor, act: Tensor, sae: SAE = sae) -> Tensor:
                out = sae(x.to(_dtype(sae)))
                if record is not None:
                    record(sae, act.to(out.dtype)[keep], out[keep])
                return torch.where(keep[..., None], out.to(act.dtype), act)

            read, write = sae_site(model, sae), written_site(model, sae)
            if sae.is_transcoder:
                stack.enter_context(edit_from(model, read, write, predict))
            else:

                def reconstruct(act: Tensor, predict: Callable[[Tensor, Tensor], Tensor] = predict) -> Tensor:
                    return predict(act, act)  # an SAE reads the activation it replaces

                stack.enter_context(edit_site(model, read, reconstruct))
        yield


def zero_ablate(model: LanguageModel, site: Site, keep: Tensor) -> AbstractContextManager[None]:
    """Within the block, the activation at `site` is replaced by zeros at the `keep [B, T]` positions."""
    return replaced_at(model, site, torch.zeros_like, keep)
