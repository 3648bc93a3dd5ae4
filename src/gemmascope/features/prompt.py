"""Latents on one piece of text, computed live: per token the top-k latents (the microscope), and
the latents that fire most on a text or on one of its tokens (search by text).

Knows the model and the SAE; knows nothing of the index file except the per-latent densities a
caller may pass in to hide dense latents.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gemmascope.errors import ConfigError
from gemmascope.models import MAX_PROMPT_TOKENS, LanguageModel, prompt_tokens, token_texts
from gemmascope.sae import SAE, encode_inputs, sae_site
from gemmascope.sites import capture

# Latents firing on more than this share of the corpus are "dense": hidden by default wherever
# features are listed (microscope, search, contrast, bias) and flagged in document analysis. The
# training recipe's density limit (`train.recipe.DENSE_DENSITY`, a test keeps them equal): latents
# above it are the ones training pushes down, so below it is where a trained SAE's sparse
# features live.
HIDE_DENSE = 0.095


def encode_text(
    model: LanguageModel, sae: SAE, text: str, max_tokens: int = MAX_PROMPT_TOKENS
) -> tuple[list[int], Tensor]:
    """Tokenise `text` (BOS first), run the model to the SAE's site and encode (`sae.encode_inputs`,
    so massive-activation positions get no latents): token ids `[T]` and latent activations
    `[T, d_sae]` on the CPU (the BOS row included; callers hide it)."""
    site = sae_site(model, sae)
    ids = prompt_tokens(model, text, max_tokens)
    x = capture(model, ids, [site])[site][0]  # [T, d_in]
    return ids[0].tolist(), encode_inputs(sae, x).float().cpu()


def _visible(acts: Tensor, densities: Tensor | None, hide_dense: float | None) -> Tensor:
    """`acts [T, d_sae]` with latents denser than `hide_dense` zeroed when densities are given."""
    if densities is None or hide_dense is None:
        return acts
    if densities.shape != (acts.shape[1],):
        raise ConfigError(f"densities have shape {tuple(densities.shape)}, expected ({acts.shape[1]},)")
    return acts * (densities.to(acts.device) <= hide_dense)


def top_features(
    model: LanguageModel,
    sae: SAE,
    text: str,
    k: int = 5,
    hide_dense: float | None = HIDE_DENSE,
    densities: Tensor | None = None,
) -> list[dict[str, Any]]:
    """For each token of `text` after BOS, the top-`k` latents by activation (only those that
    fire): `[{position, token, token_id, features: [{index, value}]}]`, position counted with BOS
    at 0. With `densities [d_sae]` (from the feature index), latents firing on more than
    `hide_dense` of tokens are hidden."""
    if k < 1:
        raise ConfigError(f"k={k} must be at least 1")
    ids, acts = encode_text(model, sae, text)
    acts = _visible(acts, densities, hide_dense)
    values, latents = acts.topk(min(k, acts.shape[1]), dim=1)
    texts = token_texts(model.tokenizer, ids)
    out = []
    for pos in range(1, len(ids)):
        feats = [
            {"index": int(i), "value": float(v)}
            for v, i in zip(values[pos].tolist(), latents[pos].tolist(), strict=True)
            if v > 0
        ]
        out.append(
            {
                "position": pos,
                "token": texts[pos],
                "token_id": ids[pos],
                "features": feats,
            }
        )
    return out


def search_text(
    model: LanguageModel,
    sae: SAE,
    text: str,
    token: str | int | None = None,
    limit: int = 20,
    densities: Tensor | None = None,
    hide_dense: float | None = None,
) -> list[dict[str, Any]]:
    """The latents that fire most on `text` (BOS excluded), or only on the positions of one of its
    tokens (`token`: the token's text, compared without surrounding spaces, or its id), by their
    max activation there: `[{index, value, position, token, mean}]` with `position`/`token` where
    the max is and `mean` the mean activation over the positions searched."""
    if limit < 1:
        raise ConfigError(f"search limit {limit} must be at least 1")
    ids, acts = encode_text(model, sae, text)
    acts = _visible(acts, densities, hide_dense)
    strings = token_texts(model.tokenizer, ids)
    positions = list(range(1, len(ids)))
    if token is not None:
        if isinstance(token, int):
            positions = [p for p in positions if ids[p] == token]
        else:
            positions = [p for p in positions if strings[p].strip() == str(token).strip()]
        if not positions:
            shown = ", ".join(repr(s) for s in strings[1:50])
            raise ConfigError(f"token {token!r} does not occur in the text; its tokens are {shown}")
    sub = acts[positions]  # [P, d_sae]
    best, where = sub.max(0)
    mean = sub.mean(0)
    order = best.argsort(descending=True)[:limit]
    out = []
    for i in order.tolist():
        if best[i] <= 0:
            break
        pos = positions[int(where[i])]
        out.append(
            {
                "index": i,
                "value": float(best[i]),
                "position": pos,
                "token": strings[pos],
                "mean": float(mean[i]),
            }
        )
    return out
