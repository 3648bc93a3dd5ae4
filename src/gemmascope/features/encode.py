"""From text to latents, the one way (the microscope, search by text, contrast, documents, one
latent on a text, a latent downstream of an intervention): each text runs through the model once,
to the deepest site asked for, and every SAE given encodes its site (`sae.encode_inputs`). One mask
decides the positions kept: BOS, EOS and pad are left out, and so are positions whose input is
massive for the SAE (`sae.massive_mask`: inputs like those its training left out); their latents are
zero. Pooling over a text is on that mask: `max`, `mean` (the sum divided by the positions kept) or
`last` (the last position kept).

Also the one dense rule: a latent firing on more than `HIDE_DENSE` of the index corpus' tokens is
"dense" (`dense_latents`), hidden by default wherever features are listed and flagged in document
analysis.

Knows the model and the SAEs; knows nothing of the index file beyond the densities passed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gemmascope.corpus import special_mask
from gemmascope.errors import ConfigError
from gemmascope.limits import MAX_PROMPT_TOKENS
from gemmascope.models import LanguageModel, prompt_tokens
from gemmascope.sae import SAE, encode_inputs, massive_mask, sae_site
from gemmascope.sites import capture

# Latents firing on more than this share of the corpus are "dense": hidden by default wherever
# features are listed (microscope, search, contrast, bias, the API) and flagged in document
# analysis. The training recipe's density limit (`train.recipe.DENSE_DENSITY`, a test keeps them
# equal): latents above it are the ones training pushes down, so below it is where a trained SAE's
# sparse features live. (evals' `DENSE_DENSITY` 0.1 is the health report's "over 10%" column, a
# measurement, not what is hidden.)
HIDE_DENSE = 0.095
POOLS = ("max", "mean", "last")


def dense_latents(densities: Tensor | None, limit: float | None = HIDE_DENSE) -> Tensor | None:
    """`[d_sae]` bool: the latents denser than `limit` (their share of the index corpus' tokens,
    `densities [d_sae]`); None when the densities are unknown or nothing is hidden (`limit` None).
    A limit of 1 hides nothing."""
    if densities is None or limit is None:
        return None
    return densities.double().cpu() > limit


def check_dense_limit(limit: float, what: str = "--dense") -> float:
    """`limit` when it is a share in (0, 1]; else a ConfigError naming `what`."""
    if not 0 < limit <= 1:
        raise ConfigError(f"{what} {limit} is out of range: expected a share in (0, 1]")
    return limit


@dataclass
class Encoded:
    """What `encode` gives: per text its token ids `[T]` (BOS first), and per SAE and text the mask
    of the positions kept `[T]`; the latents `[T, d_sae]` (zero where not kept; with `pool=None`)
    and the pooled latents `{pool: {sae_id: [n_texts, d_sae]}}` (with `pool`). On the CPU, float32."""

    ids: list[list[int]] = field(default_factory=list)
    keep: dict[str, list[Tensor]] = field(default_factory=dict)
    latents: dict[str, list[Tensor]] = field(default_factory=dict)
    pooled: dict[str, dict[str, Tensor]] = field(default_factory=dict)


def pool_latents(f: Tensor, keep: Tensor, how: str) -> Tensor:
    """`[T, d_sae] -> [d_sae]`: latents pooled over the positions `keep [T]` keeps (zero when none is)."""
    if how not in POOLS:
        raise ConfigError(f"pool {how!r}: expected one of {', '.join(POOLS)}")
    kept = f[keep]  # [K, d_sae]
    if kept.shape[0] == 0:
        return torch.zeros(f.shape[1], dtype=f.dtype)
    if how == "max":
        return kept.max(0).values
    if how == "mean":
        return kept.sum(0) / kept.shape[0]
    return kept[-1]


@torch.no_grad()
def encode(
    model: LanguageModel,
    saes: Mapping[str, SAE],
    texts: Sequence[str],
    *,
    pool: str | Sequence[str] | None = None,
    max_tokens: int = MAX_PROMPT_TOKENS,
) -> Encoded:
    """The latents of every SAE of `saes` on each text of `texts`, one forward pass per text (to the
    deepest site), on the one mask (see the module). With `pool` (one of `POOLS`, or several), each
    text's latents are pooled over its kept positions as they are computed and only the pooled ones
    are kept (`.pooled[pool][sae_id]`); without, the per-position latents are (`.latents`). A text
    that is empty or longer than `max_tokens` tokens after BOS is a ConfigError
    (`models.prompt_tokens`), and so is an SAE whose site the model lacks (`sae.sae_site`)."""
    pools = [] if pool is None else [pool] if isinstance(pool, str) else list(pool)
    for how in pools:
        if how not in POOLS:
            raise ConfigError(f"pool {how!r}: expected one of {', '.join(POOLS)}")
    if isinstance(texts, str):
        raise ConfigError("encode takes a list of texts, not one string")
    sites = {key: sae_site(model, sae, key) for key, sae in saes.items()}
    out = Encoded(keep={key: [] for key in saes})
    out.latents = {key: [] for key in saes} if not pools else {}
    rows: dict[str, dict[str, list[Tensor]]] = {how: {key: [] for key in saes} for how in pools}
    for text in texts:
        ids = prompt_tokens(model, text, max_tokens)  # [1, T]
        if ids.shape[1] < 2:
            raise ConfigError(f"text {text!r} has no token after BOS")
        text_keep = ~special_mask(ids, model.special_token_ids)[0]  # [T]
        acts = capture(model, ids, sorted(set(sites.values())))
        out.ids.append(ids[0].tolist())
        for key, sae in saes.items():
            x = acts[sites[key]][0]  # [T, d_in]
            keep = text_keep.to(x.device) & ~massive_mask(sae, x)
            f = encode_inputs(sae, x, keep).float().cpu()  # [T, d_sae]
            keep = keep.cpu()
            out.keep[key].append(keep)
            if not pools:
                out.latents[key].append(f)
            for how in pools:
                rows[how][key].append(pool_latents(f, keep, how))
    out.pooled = {
        how: {key: _stack(r, saes[key]) for key, r in by_key.items()} for how, by_key in rows.items()
    }
    return out


def _stack(rows: list[Tensor], sae: SAE) -> Tensor:
    return torch.stack(rows) if rows else torch.zeros(0, sae.d_sae)
