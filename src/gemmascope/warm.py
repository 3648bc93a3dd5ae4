"""A warm start for the command line: a running `gemmascope serve` keeps the model, the SAEs and the
index loaded, so a command about the same run asks it over HTTP instead of loading them again (about
8 s on 2 cores, most of it the model and its 262k-token tokenizer). Owns the registry of running
servers (one small JSON file per served run folder under the cache, `cache_root()/serving/`, written
when serving starts and removed when it stops; never in the run folder, which may be read-only),
finding a live one for a run folder, and the one JSON request the commands make.

Knows nothing of what the commands print or of the app's routes beyond the paths it is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gemmascope.models import cache_root

REGISTRY = "serving"
HEALTH_TIMEOUT_S = 2.0  # a server that does not answer its health check this fast is not used
REQUEST_TIMEOUT_S = 600.0  # a request waits in the server's model queue like the UI's


class ServerUnavailable(Exception):
    """The running server did not answer a request (gone, refused it, or failed): run locally."""


def _entry(run_dir: Path | str) -> Path:
    key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    return cache_root() / REGISTRY / f"{key}.json"


def announce(run_dir: Path | str, url: str) -> Path | None:
    """Record that this process serves `run_dir` at `url`; returns the record's path (None when
    the cache cannot be written: serving goes on without a warm start for the command line)."""
    path = _entry(run_dir)
    record = {"run": str(Path(run_dir).resolve()), "url": url, "pid": os.getpid()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
    except OSError:
        return None
    return path


def withdraw(path: Path | None) -> None:
    """Remove this process's record (`announce`'s path), if it is still ours."""
    if path is None:
        return
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


def running_server(run_dir: Path | str | None) -> str | None:
    """The URL of a live `gemmascope serve` of `run_dir` (its process alive and its health check
    answered), else None. A record left by a server that died is removed."""
    if run_dir is None or os.environ.get("GEMMASCOPE_NO_SERVER"):
        return None
    path = _entry(run_dir)
    try:
        record = json.loads(path.read_text())
        pid, url = int(record["pid"]), str(record["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.get("run") != str(Path(run_dir).resolve()) or not _alive(pid):
        with contextlib.suppress(OSError):
            if not _alive(pid):
                path.unlink()
        return None
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=HEALTH_TIMEOUT_S) as response:
            ok = json.loads(response.read()).get("status") == "ok"
    except (OSError, ValueError):
        return None
    return url if ok else None


def ask(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST `body` as JSON to the server at `url` and return its JSON answer; any failure (refused,
    an error status, not JSON) is `ServerUnavailable`."""
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            answer = json.loads(response.read())
    except (OSError, ValueError) as err:  # urllib's HTTPError and URLError are OSErrors
        raise ServerUnavailable(str(err)) from err
    if not isinstance(answer, dict):
        raise ServerUnavailable(f"{path} answered {type(answer).__name__}, not an object")
    return answer


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
