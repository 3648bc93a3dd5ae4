"""The microscope over HTTP: `POST /v1/activation/topk-by-token` (each token's strongest features, with
their explanations) and `POST /v1/activation/single` (one feature's activation on each token), with
their request bodies. The model work waits in the model queue; explanations are read afterwards on
a worker thread, so the model is free for the next request meanwhile.

Knows nothing of how features are computed: it calls `features.top_features`,
`features.latent_values` and `features.documents`.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter
from pydantic import Field

from gemmascope.features import HIDE_DENSE, latent_values, top_features
from gemmascope.limits import (
    MAX_DOCUMENTS,
    MAX_TOP,
    MAX_TOP_PER_TOKEN,
    REQUEST_PROMPT_CHARS,
    REQUEST_PROMPT_TOKENS,
)
from gemmascope.server.lookup import Body, QueueDep, RunDep, feature_or_4xx, sae_or_404

TOPK_PER_TOKEN = 5  # features per token the microscope lists by default
TOPK_PER_DOCUMENT = 8  # features per document and pooling

router = APIRouter()


class TopkByTokenRequest(Body):
    prompt: str = Field(max_length=REQUEST_PROMPT_CHARS)
    sae_id: str | None = None  # default: the run's first SAE
    k: int = Field(TOPK_PER_TOKEN, ge=1, le=MAX_TOP_PER_TOKEN)
    hide_dense: float = Field(HIDE_DENSE, ge=0.0, le=1.0)  # hide features firing on more than this fraction


class SingleRequest(Body):
    prompt: str = Field(max_length=REQUEST_PROMPT_CHARS)
    sae_id: str
    index: int


@router.post("/v1/activation/topk-by-token")
async def topk_by_token(body: TopkByTokenRequest, run: RunDep, queue: QueueDep) -> dict[str, Any]:
    entry = sae_or_404(run, body.sae_id) if body.sae_id else run.first_sae
    run.check_text(body.prompt)
    densities = run.column(entry, "density")

    def work() -> tuple[list[str], list[dict[str, Any]]]:
        ids = run.prompt_ids(body.prompt)  # tokens only: the model runs once, in top_features
        rows = top_features(
            run.model, entry.sae, body.prompt, k=body.k, hide_dense=body.hide_dense, densities=densities,
            max_tokens=REQUEST_PROMPT_TOKENS,
        )  # fmt: skip
        return run.token_strings(ids), rows

    tokens, rows = await queue.run(work)
    results = [  # top_features: Neuronpedia's name for a token's features
        {"position": r["position"], "token": r["token"], "top_features": r["features"]} for r in rows
    ]
    seen = sorted({f["index"] for r in rows for f in r["features"]})
    explanations = await anyio.to_thread.run_sync(lambda: run.explanations(entry, seen))
    return {
        "sae_id": entry.id,
        "tokens": tokens,
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
    """Document-level analysis (`features.documents`): each document's top features max- and
    mean-pooled (dense ones flagged), their shared features and each one's topic features."""
    from gemmascope.features.documents import documents

    entry = sae_or_404(run, body.sae_id) if body.sae_id else run.first_sae
    for text in body.documents:
        run.check_text(text)
    densities = run.column(entry, "density")

    def work() -> dict[str, Any]:
        out: dict[str, Any] = documents(
            run.model,
            entry.sae,
            body.documents,
            top=body.k,
            densities=densities,
            max_tokens=REQUEST_PROMPT_TOKENS,
        )
        return out

    out = await queue.run(work)
    seen = sorted(
        {r["index"] for d in out["documents"] for part in ("max", "mean", "topic") for r in d[part]}
        | {r["index"] for r in out["shared"]}
    )
    explanations = await anyio.to_thread.run_sync(lambda: run.explanations(entry, seen))
    return {"sae_id": entry.id, **out, "explanations": explanations}
