"""Latents on one piece of text, computed live: per token the top-k latents (the microscope), the
latents that fire most on a text or on one of its tokens (search by text), and one latent's
activation on each token (a feature page's "try your own text"). Every one reads latents through
`encode.encode` (BOS, EOS, pad and massive positions get none) and hides dense latents by
`encode.dense_latents`.

Knows the model and the SAE; knows nothing of the index file except the per-latent densities a
caller may pass in to hide dense latents.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gemmascope.errors import ConfigError
from gemmascope.features.encode import HIDE_DENSE, dense_latents, encode
from gemmascope.limits import MAX_PROMPT_TOKENS
from gemmascope.models import LanguageModel, token_texts
from gemmascope.sae import SAE

__all__ = ["HIDE_DENSE", "latent_values", "search_text", "top_features"]


def _latents(model: LanguageModel, sae: SAE, text: str, max_tokens: int) -> tuple[list[int], Tensor]:
    """Token ids `[T]` (BOS first) and latents `[T, d_sae]` of one text (`encode.encode`)."""
    enc = encode(model, {"sae": sae}, [text], max_tokens=max_tokens)
    return enc.ids[0], enc.latents["sae"][0]


def _visible(acts: Tensor, densities: Tensor | None, hide_dense: float | None) -> Tensor:
    """`acts [T, d_sae]` with latents denser than `hide_dense` zeroed when densities are given."""
    if densities is not None and densities.shape != (acts.shape[1],):
        raise ConfigError(f"densities have shape {tuple(densities.shape)}, expected ({acts.shape[1]},)")
    dense = dense_latents(densities, hide_dense)
    return acts if dense is None else acts * ~dense


def latent_values(
    model: LanguageModel, sae: SAE, text: str, latent: int, max_tokens: int = MAX_PROMPT_TOKENS
) -> tuple[list[int], list[float]]:
    """Token ids `[T]` of `text` (BOS first) and latent `latent`'s activation on each `[T]` (zero at
    BOS and wherever the mask leaves a position out)."""
    if not 0 <= latent < sae.d_sae:
        raise ConfigError(f"latent {latent} is out of range: expected 0..{sae.d_sae - 1}")
    ids, acts = _latents(model, sae, text, max_tokens)
    return ids, acts[:, latent].tolist()


def top_features(
    model: LanguageModel,
    sae: SAE,
    text: str,
    k: int = 5,
    hide_dense: float | None = HIDE_DENSE,
    densities: Tensor | None = None,
    max_tokens: int = MAX_PROMPT_TOKENS,
) -> list[dict[str, Any]]:
    """For each token of `text` after BOS, the top-`k` latents by activation (only those that
    fire): `[{position, token, token_id, features: [{index, value}]}]`, position counted with BOS
    at 0. With `densities [d_sae]` (from the feature index), latents firing on more than
    `hide_dense` of tokens are hidden."""
    if k < 1:
        raise ConfigError(f"k={k} must be at least 1")
    ids, acts = _latents(model, sae, text, max_tokens)
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
    max_tokens: int = MAX_PROMPT_TOKENS,
) -> list[dict[str, Any]]:
    """The latents that fire most on `text` (BOS excluded), or only on the positions of one of its
    tokens (`token`: the token's text, compared without surrounding spaces, or its id), by their
    max activation there: `[{index, value, position, token, mean}]` with `position`/`token` where
    the max is and `mean` the mean activation over the positions searched that the mask keeps."""
    if limit < 1:
        raise ConfigError(f"search limit {limit} must be at least 1")
    enc = encode(model, {"sae": sae}, [text], max_tokens=max_tokens)
    ids, keep = enc.ids[0], enc.keep["sae"][0]
    acts = _visible(enc.latents["sae"][0], densities, hide_dense)
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
    mean = sub.sum(0) / max(1, int(keep[positions].sum()))  # over the positions kept
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
