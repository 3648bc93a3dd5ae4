"""The command line's warm start, server side: `POST /v1/command` runs a `gemmascope` command line
typed by the user who started this server (`warm.run_command`: the words, the directory they were
typed in, the secret of the server's record) about the run folder it serves, in this process with
its model lent (`models.resident`), and answers what it printed and its exit status. The app is
given the function that runs a line (`create_app(..., run_line=)`: the CLI's `cli.run_line`, which
the server cannot import, the CLI being above it); without one it takes no commands (404). The work
waits in the model queue.

Knows nothing of what the commands do.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from gemmascope.models import resident
from gemmascope.server.errors import ApiError
from gemmascope.server.lookup import Body, QueueDep, RunDep

RunLine = Callable[[list[str], Path, Path], dict[str, Any]]  # (argv, cwd, served run) -> code, stdout, stderr

router = APIRouter(include_in_schema=False)  # for the command line, not a public API


class CommandRequest(Body):
    argv: list[str] = Field(min_length=1, max_length=512)
    cwd: str
    token: str


@router.post("/v1/command")
async def run_command(body: CommandRequest, request: Request, run: RunDep, queue: QueueDep) -> dict[str, Any]:
    run_line: RunLine | None = request.app.state.run_line
    if run_line is None or run.run_dir is None:
        raise ApiError(404, "this server takes no commands")
    if not secrets.compare_digest(body.token.encode(), request.app.state.command_token.encode()):
        raise ApiError(403, "wrong token: only the user who started this server can run commands with it")
    cwd = Path(body.cwd)
    if not cwd.is_absolute():
        raise ApiError(400, f"cwd {body.cwd!r}: expected an absolute directory")
    served = run.run_dir

    def work() -> dict[str, Any]:
        with resident(run.model):
            return run_line(body.argv, cwd, served)

    return await queue.run(work)
