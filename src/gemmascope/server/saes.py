"""What the run holds, over HTTP: `GET /health`, `GET /v1/saes` (the SAEs with their eval numbers,
the run's own in `runs.sae_order`, the report's plots, the request limits and the defaults the pages show), `GET /v1/report/{name}` and `GET /v1/feature/{sae_id}/
{index}` (a feature page's data from the feature index). None of these runs the model, so they are
answered while model requests wait.

Knows nothing of the model queue; reads the run through `server.run.Run`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from gemmascope.errors import GemmaScopeError
from gemmascope.server.errors import ApiError, public_message
from gemmascope.server.lookup import RunDep, feature_or_4xx, sae_or_404

router = APIRouter()


@router.get("/health")
def health(run: RunDep) -> dict[str, Any]:
    return {
        "status": "ok",
        "model": run.model_name,
        "saes": len(run.saes),
        "index": _index_ready(run),
    }


def _index_ready(run: Any) -> bool:
    """True only when the feature index exists and describes at least one SAE completely (an empty
    or half-built index, or a damaged file, is no index)."""
    try:
        return bool(run.feature_index().saes())
    except GemmaScopeError:
        return False


@router.get("/v1/saes")
def list_saes(run: RunDep) -> dict[str, Any]:
    plots = [name for name in run.report_files() if name.endswith((".png", ".svg"))]
    # UI.md's plot first
    plots.sort(key=lambda name: (not name.startswith("frontier_l0_delta_lm_loss"), name))
    saes = []
    for entry in run.saes.values():  # the run's own in `runs.sae_order` (find_saes), then --sae ones as named
        reason = run.not_indexed(entry)
        saes.append({**entry.summary(), "not_indexed": reason and public_message(reason, run.run_dir)})
    return {
        "run": run.run_dir.name if run.run_dir else "no run folder",
        "model": run.model_name,
        "saes": saes,
        "plots": [f"/v1/report/{name}" for name in plots],
        "limits": limits(),
        "defaults": defaults(),
    }


def limits() -> dict[str, float | int]:
    """What one request may ask (`limits.served`) and the share above which a latent is dense and
    hidden by default (`features.HIDE_DENSE`): the pages read these instead of restating them."""
    from gemmascope import limits as bounds
    from gemmascope.features import HIDE_DENSE

    return {**bounds.served(), "dense": HIDE_DENSE}


def defaults() -> dict[str, Any]:
    """What a request gets for what it leaves out: the sampling settings (`steer.SamplingSettings`),
    the cost's held-out tokens, how many features each view lists, the dense share hidden, the
    graph's pruning thresholds; the pages show these in their inputs."""
    from dataclasses import asdict

    from gemmascope.attribution import EDGE_THRESHOLD, NODE_THRESHOLD
    from gemmascope.features import HIDE_DENSE
    from gemmascope.server.activations import TOPK_PER_DOCUMENT, TOPK_PER_TOKEN
    from gemmascope.server.search import SEARCH_TOP
    from gemmascope.server.steering import SIDE_EFFECT_TOKENS
    from gemmascope.steer import SamplingSettings

    return {
        "sampling": asdict(SamplingSettings()),
        "side_effect_tokens": SIDE_EFFECT_TOKENS,
        "hide_dense": HIDE_DENSE,
        "k": TOPK_PER_TOKEN,
        "documents_k": TOPK_PER_DOCUMENT,
        "top": SEARCH_TOP,
        "pool": "max",
        "node_threshold": NODE_THRESHOLD,
        "edge_threshold": EDGE_THRESHOLD,
    }


@router.get("/v1/report/{name}")
def report_file(run: RunDep, name: str) -> FileResponse:
    path = run.report_path(name)
    if path is None:
        raise ApiError(
            404,
            f"no report file {name!r}: the run's report holds {', '.join(run.report_files()) or 'nothing'}",
        )
    return FileResponse(path)


@router.get("/v1/feature/{sae_id}/{index}")
def feature(run: RunDep, sae_id: str, index: str) -> dict[str, Any]:
    entry = sae_or_404(run, sae_id)
    i = feature_or_4xx(entry, index)
    reason = run.not_indexed(entry)
    if reason:
        raise ApiError(404, reason)
    data: dict[str, Any] = run.feature_index().feature(entry.id, i)
    return {**data, "sae": entry.summary()}
