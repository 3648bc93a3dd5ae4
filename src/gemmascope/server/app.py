"""The web app. Owns building the FastAPI app of the local UI (UI.md) over one run folder: loading the
run, the model queue every model request waits in (`MAX_WAITING`), the routers (pages and static
files, what the run holds, the microscope, search, steering, attribution graphs, the command line's
warm start; the JSON API under `/v1/` is named after Neuronpedia's inference server) and the error
handlers; and serving it with uvicorn.

Knows nothing of training or of how features are indexed: the routers call `features` and `steer`
and read the run through `server.run.Run`.
"""

from __future__ import annotations

import errno
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from gemmascope.errors import ConfigError
from gemmascope.models import LanguageModel
from gemmascope.server import activations, commands, graphs, pages, saes, search, steering
from gemmascope.server.commands import RunLine
from gemmascope.server.errors import install_error_handlers
from gemmascope.server.model_queue import ModelQueue
from gemmascope.server.pages import STATIC
from gemmascope.server.run import Run

MAX_WAITING = 64  # model requests allowed to queue; more are told to retry (503) rather than pile up

__all__ = ["MAX_WAITING", "STATIC", "create_app", "serve", "serving"]


def create_app(
    run_dir: str | Path | None,
    model: LanguageModel | str | None = None,
    extra: Sequence[str] = (),
    run_line: RunLine | None = None,
    clt: str | None = None,
) -> FastAPI:
    """The web app over one run folder, plus the SAEs named in `extra` (`--sae`: SAE folders or
    official `RELEASE/ID`s; with no run folder, only those). The model and SAEs load here, once
    (`opening.open_run`); `model` names the model (None: the run's, `runs.model_for`) or is one already
    loaded (tests). With `run_line` (the CLI's `cli.run_line`) it runs the command line's commands
    about its run folder (`commands`). `clt`: draw graphs over the run's cross-layer transcoder (a
    substring of its folder, "" for the only one) even when it has a transcoder per layer. Serve it
    with uvicorn (`serve`, or `serving` in a thread)."""
    run = Run(run_dir, model=model, extra=extra)
    run.graph_clt = clt
    app = FastAPI(
        title="gemmascope",
        version="0.1.0",
        docs_url=None,  # FastAPI's docs pages load their JavaScript from a CDN; the schema is enough
        redoc_url=None,
        openapi_url="/v1/openapi.json",
    )
    app.state.run = run
    app.state.command_token = secrets.token_urlsafe(24)  # the command line's key (`warm`, `commands`)
    app.state.run_line = run_line
    # `MAX_WAITING` is read per request, so it can be lowered while serving (tests do)
    app.state.queue = ModelQueue(run.model_lock, max_waiting=lambda: MAX_WAITING)
    app.state.model_queue = app.state.queue.waiting  # [requests waiting or running]
    install_error_handlers(app)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for router in (
        saes.router,
        activations.router,
        search.router,
        steering.router,
        graphs.router,
        commands.router,
    ):
        app.include_router(router)
    return app


def serve(
    run_dir: str | Path | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    extra: Sequence[str] = (),
    model: str | None = None,
    run_line: RunLine | None = None,
    clt: str | None = None,
) -> None:
    """Load a run folder (and/or the SAEs in `extra`) and serve its web UI until interrupted (Ctrl+C).
    While it serves, the command line's commands about the run folder are run here (`warm`;
    `run_line`, the CLI's `cli.run_line`, runs them)."""
    import uvicorn

    from gemmascope import warm

    with socket.socket() as sock:  # fail now, not after loading the model, if the port is taken
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"cannot listen on {host}:{port} ({err.strerror}): choose another port with --port"
                ) from None
            raise ConfigError(
                f"cannot listen on --host {host!r} ({err.strerror or err}): expected an address of this "
                "machine, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
            ) from None
    app = create_app(run_dir, model=model, extra=extra, run_line=run_line, clt=clt)
    what = ", ".join([str(run_dir)] * (run_dir is not None) + list(extra))
    print(f"gemmascope: serving {what} at http://{host}:{port}/  (Ctrl+C to stop)", flush=True)
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{local}:{port}"
    record = warm.announce(run_dir, url, app.state.command_token) if run_dir is not None else None
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        warm.withdraw(record)


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
