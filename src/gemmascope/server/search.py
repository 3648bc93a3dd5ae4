"""Search over HTTP: `POST /v1/search/text` with its request body, in four modes: `text` (the features
that fire on a text, run through the model queue), `explanation` (words in the features'
explanations, from the feature index), `promotes` (the features whose decoder promotes a word most,
by the logit lens standardised over the vocabulary: handles to steer towards it) and `id` (a feature
named `SAE_ID#INDEX` or by index).

Knows nothing of how features are searched: it calls `features.search_text`, `features.promoting`
and the feature index.
"""

from __future__ import annotations

from typing import Any, Literal

import anyio
from fastapi import APIRouter
from pydantic import Field

from gemmascope.features import HIDE_DENSE, dense_latents, promoting, search_text, word_token_ids
from gemmascope.limits import (
    MAX_TOP,
    MIN_CONTRAST_PROMPTS,
    REQUEST_CONTRAST_PROMPTS,
    REQUEST_PROMPT_CHARS,
    REQUEST_PROMPT_TOKENS,
)
from gemmascope.server.errors import ApiError
from gemmascope.server.lookup import Body, QueueDep, RunDep, feature_or_4xx, sae_or_404
from gemmascope.server.model_queue import ModelQueue
from gemmascope.server.run import Run
from gemmascope.sites import parse_site

SEARCH_TOP = 20  # results a search or a contrast lists by default

router = APIRouter()


class SearchRequest(Body):
    query: str = Field(max_length=REQUEST_PROMPT_CHARS)
    mode: Literal["text", "explanation", "promotes", "id"] = "text"
    sae_id: str | None = None  # text: default the run's first SAE; the other modes: default every SAE
    token: str | None = Field(None, max_length=200)  # text mode: only the positions of this token
    k: int = Field(SEARCH_TOP, ge=1, le=MAX_TOP)
    hide_dense: float = Field(
        HIDE_DENSE, ge=0.0, le=1.0
    )  # text, promotes: hide features firing on more than this


@router.post("/v1/search/text")
async def search(body: SearchRequest, run: RunDep, queue: QueueDep) -> dict[str, Any]:
    query = body.query.strip()
    if not query:
        raise ApiError(
            400, "the search query is empty: expected some text, explanation words or a feature id"
        )
    if body.mode == "id":
        return _by_id(run, query, body.sae_id)
    if body.mode == "explanation":
        return _by_explanation(run, query, body)
    if body.mode == "promotes":
        return await _by_promotes(run, queue, query, body)
    return await _by_text(run, queue, query, body)


def _by_id(run: Run, query: str, sae_id: str | None) -> dict[str, Any]:
    hits = _feature_ids(run, query, sae_id)
    for hit in hits:
        hit["explanation"] = run.explanations(run.saes[hit["sae_id"]], [hit["index"]]).get(hit["index"])
    return {"mode": "id", "results": hits}


def _feature_ids(run: Run, query: str, sae_id: str | None) -> list[dict[str, Any]]:
    """`SAE_ID#INDEX` (or `SAE_ID/INDEX`), or a bare index looked up in `sae_id` or every SAE."""
    for sep in ("#", "/"):
        if sep in query:
            key, _, idx = query.rpartition(sep)
            entry = sae_or_404(run, key.strip())
            return [{"sae_id": entry.id, "index": feature_or_4xx(entry, idx.strip())}]
    entries = [sae_or_404(run, sae_id)] if sae_id else list(run.saes.values())
    try:
        i = int(query)
    except ValueError:
        raise ApiError(
            400, f"feature id {query!r} is not understood: expected SAE_ID#INDEX or an index"
        ) from None
    hits = [{"sae_id": e.id, "index": i} for e in entries if 0 <= i < e.d_sae]
    return hits or [{"sae_id": entries[0].id, "index": feature_or_4xx(entries[0], i)}]


def _by_explanation(run: Run, query: str, body: SearchRequest) -> dict[str, Any]:
    entry = sae_or_404(run, body.sae_id) if body.sae_id else None
    if entry is not None and run.not_indexed(entry):
        raise ApiError(404, str(run.not_indexed(entry)))
    hits = run.feature_index().search_explanations(entry.id if entry else None, query, limit=body.k)
    return {"mode": "explanation", "results": [hit for hit in hits if hit["sae_id"] in run.saes]}


async def _by_promotes(run: Run, queue: ModelQueue, query: str, body: SearchRequest) -> dict[str, Any]:
    """The features of one SAE (`sae_id`) or every SAE whose logit lens promotes the word `query`
    most (any of its single-token forms), dense ones hidden where the index knows densities."""
    entries = [sae_or_404(run, body.sae_id)] if body.sae_id else list(run.saes.values())

    def work() -> tuple[dict[int, str], list[dict[str, Any]]]:
        ids = word_token_ids(run.model, query)
        hits = []
        for entry in entries:
            hidden = dense_latents(run.column(entry, "density"), body.hide_dense)
            site = parse_site(entry.sae.cfg.out_site or entry.sae.cfg.site)
            hits += [
                {"sae_id": entry.id, **h} for h in promoting(run.model, entry.sae, site, ids, hidden, body.k)
            ]
        return dict(zip(ids, run.token_strings(ids), strict=True)), sorted(hits, key=lambda h: -h["z"])[
            : body.k
        ]

    texts, hits = await queue.run(work)
    if not texts:
        raise ApiError(
            400, f"{query!r} is not one token of the model's vocabulary in any of its forms (with or without a "
            "leading space, capitalised or not): expected a word the model has as a single token",
        )  # fmt: skip
    explained = {
        key: run.explanations(run.saes[key], [h["index"] for h in hits if h["sae_id"] == key])
        for key in {h["sae_id"] for h in hits}
    }
    for hit in hits:
        hit["token"] = texts[hit.pop("token_id")]
        hit["explanation"] = explained[hit["sae_id"]].get(hit["index"])
    return {"mode": "promotes", "tokens": list(texts.values()), "results": hits}


async def _by_text(run: Run, queue: ModelQueue, query: str, body: SearchRequest) -> dict[str, Any]:
    entry = sae_or_404(run, body.sae_id) if body.sae_id else run.first_sae
    run.check_text(query)
    densities = run.column(entry, "density")

    def work() -> list[dict[str, Any]]:
        return search_text(  # type: ignore[no-any-return]
            run.model, entry.sae, query, token=body.token, limit=body.k, densities=densities,
            hide_dense=body.hide_dense, max_tokens=REQUEST_PROMPT_TOKENS,
        )  # fmt: skip

    rows = await queue.run(work)
    explained = await anyio.to_thread.run_sync(lambda: run.explanations(entry, [r["index"] for r in rows]))
    results = [{"sae_id": entry.id, **r, "explanation": explained.get(r["index"])} for r in rows]
    return {"mode": "text", "sae_id": entry.id, "results": results}


class ContrastRequest(Body):
    a: list[str] = Field(min_length=MIN_CONTRAST_PROMPTS, max_length=REQUEST_CONTRAST_PROMPTS)
    b: list[str] = Field(min_length=MIN_CONTRAST_PROMPTS, max_length=REQUEST_CONTRAST_PROMPTS)
    pool: Literal["max", "mean", "last"] = "max"  # features.POOLS
    top: int = Field(SEARCH_TOP, ge=1, le=MAX_TOP)
    hide_dense: float = Field(HIDE_DENSE, ge=0.0, le=1.0)  # 1: hide nothing


@router.post("/v1/search/contrast")
async def search_contrast(body: ContrastRequest, run: RunDep, queue: QueueDep) -> dict[str, Any]:
    """The latents over every SAE of the run that separate prompt set A from set B (Cohen's d of
    their pooled activations, with how many prompts of each set they fire on), densities from the
    feature index; as `gemmascope contrast`."""
    from gemmascope.features.contrast import contrast

    for prompt in [*body.a, *body.b]:
        run.check_text(prompt)
    saes = {key: entry.sae for key, entry in run.saes.items()}
    densities = {key: d for key, entry in run.saes.items() if (d := run.column(entry, "density")) is not None}

    def work() -> dict[str, Any]:
        out: dict[str, Any] = contrast(
            run.model, saes, body.a, body.b, pool=body.pool, top=body.top, densities=densities,
            hide_dense=body.hide_dense, max_tokens=REQUEST_PROMPT_TOKENS,
        )  # fmt: skip
        return out

    out = await queue.run(work)
    for hit in out["results"]:
        hit["explanation"] = run.explanations(run.saes[hit["sae_id"]], [hit["index"]]).get(hit["index"])
    return out
