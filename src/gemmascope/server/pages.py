"""The pages of the web UI (UI.md): feature page, microscope, steer, search, SAEs and graph. Owns their
routes and `STATIC`, the folder their HTML, JavaScript and CSS ship in; a feature page for a feature
the run does not have is an HTML 404 page. The pages fetch everything they show from the JSON API.

Knows nothing of the model: pages are files.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from gemmascope.server.errors import ApiError, public_message
from gemmascope.server.lookup import RunDep, feature_or_4xx, sae_or_404

STATIC = Path(__file__).parent / "static"

router = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type="text/html")


@router.get("/")
def microscope_page() -> FileResponse:
    return _page("index.html")


@router.get("/feature/{sae_id}/{index}")
def feature_page(run: RunDep, sae_id: str, index: str) -> Response:
    try:
        feature_or_4xx(sae_or_404(run, sae_id), index)
    except ApiError as err:
        return _error_page(err.status, public_message(err.message, run.run_dir))
    return _page("feature.html")


@router.get("/steer")
def steer_page() -> FileResponse:
    return _page("steer.html")


@router.get("/search")
def search_page() -> FileResponse:
    return _page("search.html")


@router.get("/saes")
def saes_page() -> FileResponse:
    return _page("saes.html")


@router.get("/graph")
def graphs_page() -> FileResponse:
    return _page("graph.html")


@router.get("/graph/{slug}")
def graph_page(run: RunDep, slug: str) -> Response:
    folder = run.graph_dir()
    if folder is None or not (folder / f"{slug}.json").is_file():
        return _error_page(404, f"no graph {slug!r} in this run: draw one on the graph page")
    return _page("graph.html")


@router.get("/favicon.ico")
def favicon() -> FileResponse:
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


def _error_page(status: int, message: str) -> Response:
    body = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>gemmascope: not found</title>"
        "<link rel='stylesheet' href='/static/style.css'></head><body><main><h1>Not found</h1>"
        f"<p class='error'>{escape(message)}</p><p><a href='/saes'>The SAEs of this run</a></p>"
        "</main></body></html>"
    )
    return Response(body, status_code=status, media_type="text/html")
