"""Document-level analysis (the Gemma Scope articles' headline example): for a few documents, the
topics of each (its features pooled meaning first, `rank.topic_scores`, when the index's firing
statistics are given), its top features (max- and mean-pooled over its tokens, dense ones flagged),
the features they share, and each document's own topic features (strong in it, weak in the others).

Each document runs through the model once (`encode.encode`; pooled over the positions kept: BOS,
EOS, pad and massive-activation positions left out).
A feature is shared when it is among the `top` max-pooled features of at least half the documents
(at least two); a document's topic features are those whose max-pooled activation there most
exceeds their largest in any other document, among features not denser than `dense` on the corpus.

Knows the model and one SAE; knows nothing of the index file beyond the densities passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gemmascope.errors import ConfigError
from gemmascope.features.encode import HIDE_DENSE, dense_latents, encode, pool_latents
from gemmascope.features.rank import Firing, topic_scores
from gemmascope.limits import MAX_DOCUMENTS, MAX_PROMPT_TOKENS, MAX_TOP
from gemmascope.models import LanguageModel
from gemmascope.sae import SAE


def documents(
    model: LanguageModel,
    sae: SAE,
    texts: Sequence[str],
    *,
    top: int = 10,
    densities: Tensor | None = None,
    dense: float = HIDE_DENSE,
    firing: Firing | None = None,
    max_tokens: int = MAX_PROMPT_TOKENS,
) -> dict[str, Any]:
    """Per document its topics (with `firing`: its `top` features by `rank.topic_scores`, those above
    0 among the features not denser than `dense`, each `{index, value: its meaning score, dense}`;
    [] without), its `top` features by max- and by mean-pooled activation (each `{index, value,
    dense}`, `dense` True when the feature fires on more than `dense` of the corpus per `densities
    [d_sae]`, None when unknown) and its topic features against the others; and the features shared
    by at least half of the documents (`{index, n_documents, dense}`)."""
    if isinstance(texts, str) or not 1 <= len(texts) <= MAX_DOCUMENTS:
        raise ConfigError(
            f"give 1 to {MAX_DOCUMENTS} documents (one per line), got {len(texts) if not isinstance(texts, str) else 'a string'}"
        )
    empty = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ConfigError(f"document {empty[0]} is empty: expected text")
    if not 1 <= top <= MAX_TOP:
        raise ConfigError(f"top {top} is out of range: expected 1..{MAX_TOP}")
    pooled_max, pooled_mean, topics = _pooled(model, sae, texts, firing, max_tokens)  # [n_docs, d_sae] each
    is_dense = dense_latents(densities, dense)
    if is_dense is not None:
        topics = topics * ~is_dense

    def ranked(values: Tensor, k: int) -> list[dict[str, Any]]:
        k = min(k, int((values > 0).sum()))
        order = values.topk(k).indices.tolist() if k else []
        return [
            {"index": i, "value": float(values[i]), "dense": None if is_dense is None else bool(is_dense[i])}
            for i in order
        ]

    tops = [set(r["index"] for r in ranked(row, top)) for row in pooled_max]
    counts: dict[int, int] = {}
    for found in tops:
        for i in found:
            counts[i] = counts.get(i, 0) + 1
    need = max(2, (len(texts) + 1) // 2)
    shared = sorted((i for i, c in counts.items() if c >= need), key=lambda i: (-counts[i], i))
    docs = []
    for d, text in enumerate(texts):
        others = torch.cat([pooled_max[:d], pooled_max[d + 1 :]])
        margin = pooled_max[d] - (
            others.max(0).values if others.shape[0] else torch.zeros_like(pooled_max[d])
        )
        if is_dense is not None:
            margin = torch.where(is_dense, torch.zeros_like(margin), margin)
        docs.append(
            {
                "text": text,
                "topics": ranked(topics[d], top) if firing is not None else [],
                "max": ranked(pooled_max[d], top),
                "mean": ranked(pooled_mean[d], top),
                "topic": ranked(margin, min(top, 5)) if len(texts) > 1 else [],
            }
        )
    return {
        "documents": docs,
        "shared": [
            {"index": i, "n_documents": counts[i], "dense": None if is_dense is None else bool(is_dense[i])}
            for i in shared
        ],
    }


def _pooled(
    model: LanguageModel, sae: SAE, texts: Sequence[str], firing: Firing | None, max_tokens: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Each document's latents max- and mean-pooled and its topic scores (zero without `firing`),
    `[n_docs, d_sae]` each: one forward pass per document, its per-token latents dropped after."""
    out: list[list[Tensor]] = [[], [], []]
    for text in texts:
        enc = encode(model, {"sae": sae}, [text], max_tokens=max_tokens)
        f, keep = enc.latents["sae"][0], enc.keep["sae"][0]  # [T, d_sae], [T]
        out[0].append(pool_latents(f, keep, "max"))
        out[1].append(pool_latents(f, keep, "mean"))
        out[2].append(topic_scores(f, keep, firing) if firing is not None else torch.zeros(sae.d_sae))
    pooled_max, pooled_mean, topics = (torch.stack(rows) for rows in out)
    return pooled_max, pooled_mean, topics
