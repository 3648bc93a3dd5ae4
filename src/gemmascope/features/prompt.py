"""Latents on one piece of text, computed live: its topics and per token the top-k latents, meaning
first (the microscope, `rank`), the latents that fire most on a text or on one of its tokens (search
by text), and one latent's activation on each token (a feature page's "try your own text"). Every
one reads latents through `encode.encode` (BOS, EOS, pad and massive positions get none) and hides
dense latents by `encode.dense_latents`.

Knows the model and the SAE; knows nothing of the index file except what a caller passes in: the
per-latent densities (to hide dense latents) and firing statistics (to rank meaning first).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gemmascope.errors import ConfigError
from gemmascope.features.encode import HIDE_DENSE, dense_latents, encode
from gemmascope.features.rank import DEFAULT_ORDER, Firing, check_order, meaning_scores, topic_scores
from gemmascope.limits import MAX_PROMPT_TOKENS
from gemmascope.models import LanguageModel, token_texts
from gemmascope.sae import SAE

__all__ = ["HIDE_DENSE", "latent_values", "search_text", "text_features", "top_features"]


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


def text_features(
    model: LanguageModel,
    sae: SAE,
    text: str,
    *,
    k: int = 5,
    topics: int = 10,
    hide_dense: float | None = HIDE_DENSE,
    densities: Tensor | None = None,
    firing: Firing | None = None,
    order: str = DEFAULT_ORDER,
    max_tokens: int = MAX_PROMPT_TOKENS,
) -> dict[str, Any]:
    """What the microscope shows of `text`, from one forward pass: its `topics` (the latents of the
    whole text, pooled) and, for each token after BOS, its top-`k` latents (only those that fire).
    `order` "meaning" ranks both by how unusual the activation is for its latent (`rank`: per token
    `meaning_scores`, topics `topic_scores`, those above 0), which needs the index's `firing`
    statistics; "raw", or no `firing`, by activation value (topics max-pooled). With `densities
    [d_sae]`, latents firing on more than `hide_dense` of tokens are hidden. Returns `{order (the one
    used), tokens: [{position, token, token_id, features: [{index, value, score}]}], topics: [{index,
    value, score, position, count}]}`: `value` the activation (a topic's largest, at `position`),
    `score` the meaning score (None without `firing`), `count` the tokens a topic fires on; positions
    count BOS as 0."""
    check_order(order)
    if k < 1 or topics < 0:
        raise ConfigError(f"k={k} must be at least 1 and topics={topics} at least 0")
    enc = encode(model, {"sae": sae}, [text], max_tokens=max_tokens)
    ids, keep = enc.ids[0], enc.keep["sae"][0]
    acts = _visible(enc.latents["sae"][0], densities, hide_dense)  # [T, d_sae]
    used = order if firing is not None else "raw"
    scores = meaning_scores(acts, firing) if firing is not None else None  # [T, d_sae]
    pooled, where = acts.max(0)  # [d_sae] each
    topic = topic_scores(acts, keep, firing) if firing is not None else None  # [d_sae]
    texts = token_texts(model.tokenizer, ids)
    rows = []
    for pos in range(1, len(ids)):
        by = scores[pos] if used == "meaning" and scores is not None else acts[pos]
        feats = _listed(by, acts[pos], None if scores is None else scores[pos], k)
        rows.append({"position": pos, "token": texts[pos], "token_id": ids[pos], "features": feats})
    by = topic if used == "meaning" and topic is not None else pooled
    listed = _listed(by, pooled, topic, topics, positive=used == "meaning") if topics else []
    count = (acts > 0).sum(0)
    for r in listed:
        r.update(position=int(where[r["index"]]), count=int(count[r["index"]]))
    return {"order": used, "tokens": rows, "topics": listed}


def _listed(
    by: Tensor, values: Tensor, scores: Tensor | None, k: int, positive: bool = False
) -> list[dict[str, Any]]:
    """The top-`k` latents by `by [d_sae]` among those firing (`values [d_sae]` > 0; with `positive`,
    those whose `by` is above 0), each `{index, value, score}`."""
    listed = (values > 0) & (by > 0) if positive else values > 0
    by = torch.where(listed, by, torch.full_like(by, -torch.inf))
    order = by.topk(min(k, len(by))).indices.tolist()
    return [
        {
            "index": i,
            "value": float(values[i]),
            "score": None if scores is None else round(float(scores[i]), 4),
        }
        for i in order
        if listed[i]
    ]


def top_features(
    model: LanguageModel,
    sae: SAE,
    text: str,
    k: int = 5,
    hide_dense: float | None = HIDE_DENSE,
    densities: Tensor | None = None,
    max_tokens: int = MAX_PROMPT_TOKENS,
    firing: Firing | None = None,
    order: str = DEFAULT_ORDER,
) -> list[dict[str, Any]]:
    """For each token of `text` after BOS, its top-`k` latents (only those that fire), as
    `text_features` ranks them (by raw activation without `firing`): `[{position, token, token_id,
    features: [{index, value, score}]}]`, position counted with BOS at 0."""
    return text_features(  # type: ignore[no-any-return]
        model, sae, text, k=k, topics=0, hide_dense=hide_dense, densities=densities, firing=firing,
        order=order, max_tokens=max_tokens,
    )["tokens"]  # fmt: skip


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
