"""The web app. Owns the HTTP surface of the local UI (UI.md): the JSON API under `/v1/` (named after
Neuronpedia's inference server), the five pages and their static files, and turning every bad
request into a 4xx with a JSON `{"error": message}` while the server keeps serving.

Knows nothing of training or of how features are indexed: it calls `features` and `steer` and
reads the run through `server.run.Run`. A request that runs the model waits for it without holding
a worker thread, then runs on a worker thread of its own, so other requests (pages, feature
lookups) are answered meanwhile.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from html import escape
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gemmascope.errors import ConfigError, GemmaScopeError
from gemmascope.models import LanguageModel
from gemmascope.server.run import MAX_NEW_TOKENS, MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, LoadedSAE, Run

STATIC = Path(__file__).parent / "static"
MAX_WAITING = 64  # model requests allowed to queue; more are told to retry (503) rather than pile up
MAX_STEER_FEATURES = 8
T = TypeVar("T")


class ApiError(Exception):
    """A bad request, answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------------
# Request bodies. Unknown fields are refused, so a misspelt option is not silently ignored.


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TopkByTokenRequest(_Body):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    sae_id: str | None = None  # default: the run's first SAE
    k: int = Field(5, ge=1, le=20)
    hide_dense: float = Field(0.01, ge=0.0, le=1.0)  # hide features firing on more than this fraction


class SingleRequest(_Body):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    sae_id: str
    index: int


class SearchRequest(_Body):
    query: str = Field(max_length=MAX_PROMPT_CHARS)
    mode: Literal["text", "explanation", "id"] = "text"
    sae_id: str | None = None  # text: default the run's first SAE; explanation / id: default every SAE
    token: str | None = Field(None, max_length=200)  # text mode: only the positions of this token
    k: int = Field(20, ge=1, le=100)
    hide_dense: float = Field(0.01, ge=0.0, le=1.0)  # text mode: hide features firing on more than this


class SteerFeature(_Body):
    sae_id: str
    index: int
    strength: float | None = Field(None, allow_inf_nan=False)  # default: the feature's max activation
    mode: Literal["add", "clamp", "ablate"] = "add"


class SteerRequest(_Body):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    features: list[SteerFeature] = Field(min_length=1, max_length=MAX_STEER_FEATURES)
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    freq_penalty: float = Field(1.0, ge=-2.0, le=2.0)
    normalize: bool = False  # add unit-norm decoder directions


# ---------------------------------------------------------------------------------------------
# The app


def create_app(run_dir: str | Path, model: LanguageModel | None = None) -> FastAPI:
    """The web app over one run folder. The model and SAEs load here, once; pass `model` to reuse
    one already loaded (tests). Serve it with uvicorn (`serve`, or `serving` in a thread)."""
    run = Run(run_dir, model=model)
    app = FastAPI(
        title="gemmascope",
        version="0.1.0",
        docs_url=None,  # FastAPI's docs pages load their JavaScript from a CDN; the schema is enough
        redoc_url=None,
        openapi_url="/v1/openapi.json",
    )
    app.state.run = run
    # One worker thread runs model work, in arrival order; queued requests hold no thread, so
    # pages and index lookups are answered meanwhile. (A thread pool, not an event-loop primitive,
    # so the app works under any event loop: uvicorn's, or a test client's.)
    model_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemmascope-model")
    queued = [0]
    app.state.model_queue = queued

    async def on_model(fn: Callable[[], T]) -> T:
        """Run `fn` (model work) on the model's worker thread and wait for it."""
        if queued[0] >= MAX_WAITING:
            raise ApiError(503, f"the model is busy with {queued[0]} requests; try again shortly")
        queued[0] += 1

        def locked() -> T:
            with run.model_lock:
                return fn()

        try:
            return await asyncio.wrap_future(model_worker.submit(locked))
        finally:
            queued[0] -= 1

    _install_error_handlers(app)

    # -- pages -----------------------------------------------------------------------------------

    def page(name: str) -> FileResponse:
        return FileResponse(STATIC / name, media_type="text/html")

    @app.get("/", include_in_schema=False)
    def microscope_page() -> FileResponse:
        return page("index.html")

    @app.get("/feature/{sae_id}/{index}", include_in_schema=False)
    def feature_page(sae_id: str, index: str) -> Response:
        try:
            _index(_sae(run, sae_id), index)
        except ApiError as err:
            return _error_page(err)
        return page("feature.html")

    @app.get("/steer", include_in_schema=False)
    def steer_page() -> FileResponse:
        return page("steer.html")

    @app.get("/search", include_in_schema=False)
    def search_page() -> FileResponse:
        return page("search.html")

    @app.get("/saes", include_in_schema=False)
    def saes_page() -> FileResponse:
        return page("saes.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- API: what the run holds -----------------------------------------------------------------

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": run.model_name,
            "saes": len(run.saes),
            "index": run.index_path.is_file(),
        }

    @app.get("/v1/saes")
    def list_saes() -> dict[str, Any]:
        plots = [name for name in run.report_files() if name.endswith((".png", ".svg"))]
        plots.sort(
            key=lambda name: (not name.startswith("frontier_l0_delta_lm_loss"), name)
        )  # UI.md's plot first
        return {
            "run": run.run_dir.name,
            "model": run.model_name,
            "saes": [
                {**entry.summary(), "not_indexed": run.not_indexed(entry)} for entry in run.saes.values()
            ],
            "plots": [f"/v1/report/{name}" for name in plots],
            "limits": {
                "max_prompt_tokens": MAX_PROMPT_TOKENS,
                "max_prompt_chars": MAX_PROMPT_CHARS,
                "max_new_tokens": MAX_NEW_TOKENS,
            },
        }

    @app.get("/v1/report/{name}")
    def report_file(name: str) -> FileResponse:
        path = run.report_path(name)
        if path is None:
            raise ApiError(
                404,
                f"no report file {name!r}: the run's report holds {', '.join(run.report_files()) or 'nothing'}",
            )
        return FileResponse(path)

    @app.get("/v1/feature/{sae_id}/{index}")
    def feature(sae_id: str, index: str) -> dict[str, Any]:
        entry = _sae(run, sae_id)
        i = _index(entry, index)
        reason = run.not_indexed(entry)
        if reason:
            raise ApiError(404, reason)
        data: dict[str, Any] = run.feature_index().feature(entry.id, i)
        return {**data, "sae": entry.summary()}

    # -- API: running the model ------------------------------------------------------------------

    @app.post("/v1/activation/topk-by-token")
    async def topk_by_token(body: TopkByTokenRequest) -> dict[str, Any]:
        from gemmascope.features import top_features

        entry = _sae(run, body.sae_id) if body.sae_id else run.first_sae
        run.check_text(body.prompt)
        densities = run.column(entry, "density")

        def work() -> tuple[list[str], list[dict[str, Any]]]:
            ids = run.prompt_ids(body.prompt)
            rows = top_features(
                run.model, entry.sae, body.prompt, k=body.k, hide_dense=body.hide_dense, densities=densities
            )
            return run.token_strings(ids), rows

        tokens, rows = await on_model(work)
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

    @app.post("/v1/activation/single")
    async def single(body: SingleRequest) -> dict[str, Any]:
        entry = _sae(run, body.sae_id)
        i = _index(entry, body.index)
        run.check_text(body.prompt)

        def work() -> tuple[list[str], list[float]]:
            ids = run.prompt_ids(body.prompt)
            return run.token_strings(ids), run.feature_acts(entry, i, ids)

        tokens, values = await on_model(work)
        best = max(range(1, len(values)), key=lambda t: values[t])  # BOS excluded
        return {
            "sae_id": entry.id,
            "index": i,
            "tokens": tokens,
            "activation": {"values": values, "max_value": values[best], "max_value_index": best},
        }

    @app.post("/v1/search/text")
    async def search(body: SearchRequest) -> dict[str, Any]:
        query = body.query.strip()
        if not query:
            raise ApiError(
                400, "the search query is empty: expected some text, explanation words or a feature id"
            )
        if body.mode == "id":
            hits = _search_id(run, query, body.sae_id)
            for hit in hits:
                hit["explanation"] = run.explanations(run.saes[hit["sae_id"]], [hit["index"]]).get(
                    hit["index"]
                )
            return {"mode": "id", "results": hits}
        if body.mode == "explanation":
            entry = _sae(run, body.sae_id) if body.sae_id else None
            if entry is not None and run.not_indexed(entry):
                raise ApiError(404, str(run.not_indexed(entry)))
            hits = run.feature_index().search_explanations(entry.id if entry else None, query, limit=body.k)
            return {"mode": "explanation", "results": [hit for hit in hits if hit["sae_id"] in run.saes]}
        from gemmascope.features import search_text

        entry = _sae(run, body.sae_id) if body.sae_id else run.first_sae
        run.check_text(query)
        densities = run.column(entry, "density")

        def work() -> list[dict[str, Any]]:
            run.prompt_ids(query)
            return search_text(  # type: ignore[no-any-return]
                run.model,
                entry.sae,
                query,
                token=body.token,
                limit=body.k,
                densities=densities,
                hide_dense=body.hide_dense,
            )

        rows = await on_model(work)
        explained = await anyio.to_thread.run_sync(
            lambda: run.explanations(entry, [r["index"] for r in rows])
        )
        results = [{"sae_id": entry.id, **r, "explanation": explained.get(r["index"])} for r in rows]
        return {"mode": "text", "sae_id": entry.id, "results": results}

    @app.post("/v1/steer/completion")
    async def steer_completion(body: SteerRequest) -> dict[str, Any]:
        from gemmascope.steer import Intervention, generate_pair

        run.check_text(body.prompt)
        interventions = []
        applied = []
        for feat in body.features:
            entry = _sae(run, feat.sae_id)
            i = _index(entry, feat.index)
            max_acts = run.column(entry, "max_act")
            max_act = float(max_acts[i]) if max_acts is not None else None
            strength = feat.strength
            if strength is None and feat.mode != "ablate":
                if not max_act:
                    raise ApiError(
                        400,
                        f"give a strength for {entry.id}#{i}: its max activation (the default) is unknown",
                    )
                strength = max_act
            if strength is not None:
                limit = run.strength_limit(max_act)
                if not math.isfinite(strength) or abs(strength) > limit:
                    raise ApiError(
                        400,
                        f"strength {strength:g} for {entry.id}#{i} is out of range: expected a number in "
                        f"-{limit:g}..{limit:g}",
                    )
            interventions.append(Intervention(entry.sae, i, feat.mode, strength, body.normalize))
            applied.append({"sae_id": entry.id, "index": i, "mode": feat.mode, "strength": strength})

        def work() -> Any:
            run.prompt_ids(body.prompt)
            return generate_pair(
                run.model,
                body.prompt,
                interventions,
                max_new_tokens=body.max_new_tokens,
                temperature=body.temperature,
                seed=body.seed,
                freq_penalty=body.freq_penalty,
            )

        pair = await on_model(work)
        return {
            "prompt": body.prompt,
            "features": applied,
            "settings": {
                "max_new_tokens": body.max_new_tokens,
                "temperature": body.temperature,
                "seed": body.seed,
                "freq_penalty": body.freq_penalty,
                "normalize": body.normalize,
            },
            "default": pair.default,
            "steered": pair.steered,
            "outputs": [
                {"type": "DEFAULT", "output": pair.default},
                {"type": "STEERED", "output": pair.steered},
            ],
        }

    return app


# ---------------------------------------------------------------------------------------------
# Looking up what a request names (never a path: SAEs by id in the run's table)


def _sae(run: Run, key: str) -> LoadedSAE:
    if key not in run.saes:
        known = ", ".join(list(run.saes)[:12])
        raise ApiError(404, f"unknown SAE {key!r}: this run has {known}")
    return run.saes[key]


def _index(entry: LoadedSAE, index: str | int) -> int:
    try:
        i = int(index)
    except ValueError:
        raise ApiError(
            400, f"feature index {index!r} is not an integer: expected 0..{entry.d_sae - 1}"
        ) from None
    if not 0 <= i < entry.d_sae:
        raise ApiError(
            404, f"feature index {i} is out of range for SAE {entry.id!r}: expected 0..{entry.d_sae - 1}"
        )
    return i


def _search_id(run: Run, query: str, sae_id: str | None) -> list[dict[str, Any]]:
    """`SAE_ID#INDEX` (or `SAE_ID/INDEX`), or a bare index looked up in `sae_id` or every SAE."""
    for sep in ("#", "/"):
        if sep in query:
            key, _, idx = query.rpartition(sep)
            entry = _sae(run, key.strip())
            return [{"sae_id": entry.id, "index": _index(entry, idx.strip())}]
    entries = [_sae(run, sae_id)] if sae_id else list(run.saes.values())
    try:
        i = int(query)
    except ValueError:
        raise ApiError(
            400, f"feature id {query!r} is not understood: expected SAE_ID#INDEX or an index"
        ) from None
    hits = [{"sae_id": e.id, "index": i} for e in entries if 0 <= i < e.d_sae]
    return hits or [{"sae_id": entries[0].id, "index": _index(entries[0], i)}]


# ---------------------------------------------------------------------------------------------
# Errors: always JSON, 4xx for what the user did


def _install_error_handlers(app: FastAPI) -> None:
    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError) -> JSONResponse:
        return error(err.status, err.message)

    @app.exception_handler(GemmaScopeError)
    async def user_error(_request: Request, err: GemmaScopeError) -> JSONResponse:
        return error(400, str(err))

    @app.exception_handler(RequestValidationError)
    async def bad_body(_request: Request, err: RequestValidationError) -> JSONResponse:
        problems = []
        for item in err.errors():
            if item.get("type") == "json_invalid":
                reason = (item.get("ctx") or {}).get("error", "it cannot be parsed")
                return error(400, f"malformed JSON body: {reason}")
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
            if not where:
                problems.append("the body must be a JSON object of the documented fields")
                continue
            problems.append(f"{where}: {item.get('msg', 'invalid')}")
        return error(422, "invalid request: " + "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error(err.status_code, str(err.detail))


def _error_page(err: ApiError) -> Response:
    body = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>gemmascope: not found</title>"
        "<link rel='stylesheet' href='/static/style.css'></head><body><main><h1>Not found</h1>"
        f"<p class='error'>{escape(err.message)}</p><p><a href='/saes'>The SAEs of this run</a></p>"
        "</main></body></html>"
    )
    return Response(body, status_code=err.status, media_type="text/html")


# ---------------------------------------------------------------------------------------------
# Serving


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load a run folder and serve its web UI until interrupted (Ctrl+C)."""
    import uvicorn

    with socket.socket() as sock:  # fail now, not after loading the model, if the port is taken
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({err.strerror}): choose another port with --port"
            ) from err
    app = create_app(run_dir)
    print(f"gemmascope: serving {run_dir} at http://{host}:{port}/  (Ctrl+C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` with uvicorn on a background thread for the duration of the block and yield its
    base URL (port 0: a free port). For browser tests and the screenshot script."""
    import uvicorn

    if port == 0:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the web server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
