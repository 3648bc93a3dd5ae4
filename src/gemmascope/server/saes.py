"""What the run holds, over HTTP: `GET /health`, `GET /v1/saes` (the SAEs with their eval numbers,
the report's plots and the request limits), `GET /v1/report/{name}` and `GET /v1/feature/{sae_id}/
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
from gemmascope.server.run import MAX_NEW_TOKENS, MAX_PROMPT_CHARS, MAX_REQUEST_TOKENS

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
    for entry in run.saes.values():
        reason = run.not_indexed(entry)
        saes.append({**entry.summary(), "not_indexed": reason and public_message(reason, run.run_dir)})
    return {
        "run": run.run_dir.name if run.run_dir else "no run folder",
        "model": run.model_name,
        "saes": saes,
        "plots": [f"/v1/report/{name}" for name in plots],
        "limits": {
            "max_prompt_tokens": MAX_REQUEST_TOKENS,
            "max_prompt_chars": MAX_PROMPT_CHARS,
            "max_new_tokens": MAX_NEW_TOKENS,
        },
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
