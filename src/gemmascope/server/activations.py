"""The microscope over HTTP: `POST /v1/activation/topk-by-token` (a text's topics and each token's top
features, meaning first unless `order` is "raw", with their explanations) and `POST
/v1/activation/single` (one feature's activation on each token), with their request bodies. The
model work waits in the model queue; explanations are read afterwards on a worker thread, so the
model is free for the next request meanwhile.

Knows nothing of how features are computed or ranked: it calls `features.text_features`,
`features.latent_values` and `features.documents`.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter
from pydantic import Field

from gemmascope.features import DEFAULT_ORDER, HIDE_DENSE, latent_values, text_features
from gemmascope.features.rank import RAW_NOTE, Order
from gemmascope.limits import (
    MAX_DOCUMENTS,
    MAX_TOP,
    MAX_TOP_PER_TOKEN,
    REQUEST_PROMPT_CHARS,
    REQUEST_PROMPT_TOKENS,
)
from gemmascope.server.lookup import Body, QueueDep, RunDep, feature_or_4xx, sae_or_404

TOPK_PER_TOKEN = 5  # features per token the microscope lists by default
TOPICS = 10  # topics of the whole text the microscope lists by default
TOPK_PER_DOCUMENT = 8  # features per document and pooling

router = APIRouter()


class TopkByTokenRequest(Body):
    prompt: str = Field(max_length=REQUEST_PROMPT_CHARS)
    sae_id: str | None = None  # default: the run's first SAE
    k: int = Field(TOPK_PER_TOKEN, ge=1, le=MAX_TOP_PER_TOKEN)
    hide_dense: float = Field(HIDE_DENSE, ge=0.0, le=1.0)  # hide features firing on more than this fraction
    order: Order = DEFAULT_ORDER  # meaning first (features.rank), or by activation
    topics: int = Field(TOPICS, ge=0, le=MAX_TOP)  # the whole text's features, listed first


class SingleRequest(Body):
    prompt: str = Field(max_length=REQUEST_PROMPT_CHARS)
    sae_id: str
    index: int


@router.post("/v1/activation/topk-by-token")
async def topk_by_token(body: TopkByTokenRequest, run: RunDep, queue: QueueDep) -> dict[str, Any]:
    entry = sae_or_404(run, body.sae_id) if body.sae_id else run.first_sae
    run.check_text(body.prompt)
    densities = run.column(entry, "density")
    firing = await anyio.to_thread.run_sync(lambda: run.firing(entry))  # read once, then remembered

    def work() -> tuple[list[str], dict[str, Any]]:
        ids = run.prompt_ids(body.prompt)  # tokens only: the model runs once, in text_features
        found = text_features(
            run.model, entry.sae, body.prompt, k=body.k, topics=body.topics, hide_dense=body.hide_dense,
            densities=densities, firing=firing, order=body.order, max_tokens=REQUEST_PROMPT_TOKENS,
        )  # fmt: skip
        return run.token_strings(ids), found

    tokens, found = await queue.run(work)
    results = [  # top_features: Neuronpedia's name for a token's features
        {"position": r["position"], "token": r["token"], "top_features": r["features"]}
        for r in found["tokens"]
    ]
    seen = sorted(
        {f["index"] for r in found["tokens"] for f in r["features"]} | {t["index"] for t in found["topics"]}
    )
    explanations = await anyio.to_thread.run_sync(lambda: run.explanations(entry, seen))
    return {
        "sae_id": entry.id,
        "tokens": tokens,
        "order": found["order"],
        "order_note": RAW_NOTE if found["order"] != body.order else None,
        "topics": found["topics"],
        "results": results,
        "explanations": explanations,
        "dense_hidden": densities is not None,
    }


@router.post("/v1/activation/single")
async def single(body: SingleRequest, run: RunDep, queue: QueueDep) -> dict[str, Any]:
    entry = sae_or_404(run, body.sae_id)
    i = feature_or_4xx(entry, body.index)
    run.check_text(body.prompt)

    def work() -> tuple[list[str], list[float]]:
        ids, values = latent_values(run.model, entry.sae, body.prompt, i, max_tokens=REQUEST_PROMPT_TOKENS)
        return run.token_strings(ids), values

    tokens, values = await queue.run(work)
    best = max(range(1, len(values)), key=lambda t: values[t])  # BOS excluded
    return {
        "sae_id": entry.id,
        "index": i,
        "tokens": tokens,
        "activation": {"values": values, "max_value": values[best], "max_value_index": best},
    }


class DocumentsRequest(Body):
    documents: list[str] = Field(min_length=1, max_length=MAX_DOCUMENTS)
    sae_id: str | None = None  # default: the run's first SAE
    k: int = Field(TOPK_PER_DOCUMENT, ge=1, le=MAX_TOP)


@router.post("/v1/activation/documents")
async def documents_view(body: DocumentsRequest, run: RunDep, queue: QueueDep) -> dict[str, Any]:
    """Document-level analysis (`features.documents`): each document's topics (pooled meaning
    first), its top features max- and mean-pooled (dense ones flagged), their shared features and
    each one's topic features."""
    from gemmascope.features.documents import documents

    entry = sae_or_404(run, body.sae_id) if body.sae_id else run.first_sae
    for text in body.documents:
        run.check_text(text)
    densities = run.column(entry, "density")
    firing = await anyio.to_thread.run_sync(lambda: run.firing(entry))

    def work() -> dict[str, Any]:
        out: dict[str, Any] = documents(
            run.model,
            entry.sae,
            body.documents,
            top=body.k,
            densities=densities,
            firing=firing,
            max_tokens=REQUEST_PROMPT_TOKENS,
        )
        return out

    out = await queue.run(work)
    seen = sorted(
        {r["index"] for d in out["documents"] for part in ("topics", "max", "mean", "topic") for r in d[part]}
        | {r["index"] for r in out["shared"]}
    )
    explanations = await anyio.to_thread.run_sync(lambda: run.explanations(entry, seen))
    return {"sae_id": entry.id, **out, "explanations": explanations}
