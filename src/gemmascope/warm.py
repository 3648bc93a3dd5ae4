"""A warm start for the command line: a running `gemmascope serve` keeps the model loaded, so a
command about the same run (`WARM_COMMANDS`: inspect, contrast, bias, steer, attribute) is run by it,
in its process, instead of loading the model again (about 8 s on 2 cores, most of it the model and
its 262k-token tokenizer). Owns the registry of running servers (one small JSON file per served run
folder under the cache, `cache_root()/serving/`, readable by its owner only, written when serving
starts and removed when it stops; never in the run folder, which may be read-only), finding a live
one for a run folder, and the request that hands a command line to it (`run_command`: the words as
typed, the working directory, the server's secret from the record, so only the user who started the
server can use it; what the command printed and its exit status come back).

Knows nothing of what the commands do; the server runs them (`server.commands`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemmascope.models import cache_root

REGISTRY = "serving"
HEALTH_TIMEOUT_S = 2.0  # a server that does not answer its health check this fast is not used
REQUEST_TIMEOUT_S = 3600.0  # a command waits in the server's model queue, then runs (a graph: minutes)
WARM_COMMANDS = ("inspect", "contrast", "bias", "steer", "attribute")  # commands a server can run


@dataclass(frozen=True)
class Server:
    """A live server of a run folder: its base URL and the secret its record holds."""

    url: str
    token: str


class ServerUnavailable(Exception):
    """The running server did not take the command (gone, or refused it before running it): the
    command runs here."""


class ServerFailed(Exception):
    """The running server took the command and then failed on it, or did not answer in time (it may
    still be running it): the command is not run a second time here."""


def _entry(run_dir: Path | str) -> Path:
    key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    return cache_root() / REGISTRY / f"{key}.json"


def announce(run_dir: Path | str, url: str, token: str) -> Path | None:
    """Record that this process serves `run_dir` at `url` and takes commands with `token`; returns
    the record's path (None when the cache cannot be written: serving goes on without a warm start
    for the command line). The record is readable by its owner only."""
    path = _entry(run_dir)
    record = {"run": str(Path(run_dir).resolve()), "url": url, "pid": os.getpid(), "token": token}
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder = path.parent.lstat()
        if folder.st_uid != os.getuid() or path.parent.is_symlink():  # another user's: not ours to use
            return None
        if folder.st_mode & 0o077:  # ours, made before records held a secret: no one else's now
            os.chmod(path.parent, 0o700)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(tmp, flags, 0o600), "w") as f:
            f.write(json.dumps(record))
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


def running_server(run_dir: Path | str | None) -> Server | None:
    """A live `gemmascope serve` of `run_dir` (its process alive and its health check answered),
    else None. A record left by a server that died is removed. `GEMMASCOPE_NO_SERVER` set: None."""
    if run_dir is None or os.environ.get("GEMMASCOPE_NO_SERVER"):
        return None
    path = _entry(run_dir)
    try:
        if not (_private(path.parent) and _private(path)):  # only a record of this user's own server
            return None
        record = json.loads(path.read_text())
        pid, url, token = int(record["pid"]), str(record["url"]), str(record["token"])
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
    return Server(url, token) if ok else None


def run_command(server: Server, argv: list[str], cwd: Path | str) -> dict[str, Any]:
    """Have `server` run the command line `argv` (as typed, relative paths meant from `cwd`) and
    return `{"code", "stdout", "stderr"}`. `ServerUnavailable` when it did not take the command
    (no connection, or refused it: 4xx); `ServerFailed` when it took it and failed (5xx, an answer
    that is not the expected JSON) or did not answer in time."""
    body = {"argv": argv, "cwd": str(Path(cwd).resolve()), "token": server.token}
    request = urllib.request.Request(
        server.url + "/v1/command",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as err:
        if err.code < 500:
            raise ServerUnavailable(f"it refused the command: HTTP {err.code}") from err
        raise ServerFailed(f"it failed on the command: HTTP {err.code}") from err
    except urllib.error.URLError as err:  # no connection: nothing was run
        if isinstance(err.reason, TimeoutError):
            raise ServerFailed("it did not answer in time") from err
        raise ServerUnavailable(str(err.reason)) from err
    except TimeoutError as err:
        raise ServerFailed("it did not answer in time") from err
    except (OSError, ValueError) as err:
        raise ServerFailed(f"its answer was cut off or not JSON ({err})") from err
    keys = ("code", "stdout", "stderr")
    if not isinstance(answer, dict) or not all(k in answer for k in keys):
        raise ServerFailed("its answer was not the command's output")
    return answer


def _alive(pid: int) -> bool:
    """Whether `pid` is a live process of this user (another user's is not ours to ask)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _private(path: Path) -> bool:
    """Whether `path` (the registry folder or a record) is this user's and no one else's."""
    st = path.lstat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o077 and not path.is_symlink()
