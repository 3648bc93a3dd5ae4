"""How the server answers what went wrong. Owns `ApiError` (a bad request with its HTTP status), the
exception handlers that turn every bad request into a 4xx (or a 503 when the model is busy) with a
JSON `{"error": message}` while the server keeps serving, the catch-all that answers anything else
(a bug) with a JSON 500 too, never plain text, and keeping absolute server paths out of
every message a client sees.

Knows nothing of the routes: they raise `ApiError` or the project's `GemmaScopeError`s.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gemmascope.errors import GemmaScopeError

_QUOTED_ABSOLUTE_PATH = re.compile(r"""(?<=['"])/[^'"]*/([^'"/]+)(?=['"])""")


class ApiError(Exception):
    """A bad request, answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def public_message(message: str, run_dir: Path | None) -> str:
    """`message` without absolute server paths: the run folder becomes its name (so the index is
    `NAME/features.sqlite`), any other quoted absolute path its last part."""
    if run_dir is not None:
        message = message.replace(str(run_dir), run_dir.name)
    return _QUOTED_ABSOLUTE_PATH.sub(r"\1", message)


def _run_dir(request: Request) -> Path | None:
    run = getattr(request.app.state, "run", None)
    return run.run_dir if run is not None else None


def error_response(request: Request, status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": public_message(message, _run_dir(request))}, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error a request can cause with JSON (`{"error": message}`)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(request, err.status, err.message)

    @app.exception_handler(GemmaScopeError)
    async def user_error(request: Request, err: GemmaScopeError) -> JSONResponse:
        return error_response(request, 400, str(err))

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(request, *_validation_message(err))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(request, err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        # a bug, never the client's doing: answered in JSON like the rest (the server still logs
        # its traceback: Starlette re-raises it after this answer is sent)
        return error_response(
            request, 500, f"internal error ({type(err).__name__}) in {request.url.path}: see the server log"
        )


def _validation_message(err: RequestValidationError) -> tuple[int, str]:
    """400 for a body that is not JSON, else 422 naming each bad field and why."""
    problems = []
    for item in err.errors():
        if item.get("type") == "json_invalid":
            reason = (item.get("ctx") or {}).get("error", "it cannot be parsed")
            return 400, f"malformed JSON body: {reason}"
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        if not where:
            problems.append("the body must be a JSON object of the documented fields")
            continue
        problems.append(f"{where}: {item.get('msg', 'invalid')}")
    return 422, "invalid request: " + "; ".join(problems)
