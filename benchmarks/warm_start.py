"""The command line's warm start: `gemmascope inspect` on a run alone (it loads the model, the SAE and
the index itself) against the same command while `gemmascope serve` of that run is up (it asks the
server, `gemmascope.warm`), each timed as a new process, the way a researcher runs it.

    python benchmarks/warm_start.py runs/demo
    python benchmarks/warm_start.py runs/demo --repeats 5 --text "The vaccine trial ended early"

Starts `gemmascope serve RUN --port PORT` as a subprocess, waits for its health check, then alternates
cold (`GEMMASCOPE_NO_SERVER=1`: the command does not look for a server) and warm runs of the same
command; checks that both print the same; stops the server. Prints a table and writes
benchmarks/results/warm_start.json (wall seconds of each run, medians, their ratio, the server's own
start-up time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TEXT = "Regulators back first jab against the common cold after large trial halves infections"


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str, str]:
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return time.monotonic() - started, done.stdout, done.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--text", default=TEXT)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args()
    gs = [sys.executable, "-m", "gemmascope.cli"]
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("GEMMASCOPE_NO_SERVER", None)
    started = time.monotonic()
    server = subprocess.Popen([*gs, "serve", str(args.run), "--port", str(args.port)], env=env)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health", timeout=2) as r:
                    if json.loads(r.read())["status"] == "ok":
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() - started > 300:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.5)
        server_s = time.monotonic() - started
        cmd = [*gs, "inspect", "--run", str(args.run), args.text, "--color", "never"]
        cold, warm = [], []
        for _ in range(args.repeats):
            s, cold_out, cold_err = timed(cmd, {**env, "GEMMASCOPE_NO_SERVER": "1"})
            cold.append(s)
            s, warm_out, warm_err = timed(cmd, env)
            warm.append(s)
            if "answered by the running gemmascope serve" not in warm_err or warm_out != cold_out:
                raise SystemExit(f"the warm run did not ask the server or printed otherwise:\n{warm_err}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    out = {
        "command": "python benchmarks/warm_start.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "inspect": shlex.join(cmd[2:]),
        "server_start_s": server_s,
        "cold_s": cold,
        "warm_s": warm,
        "cold_median_s": statistics.median(cold),
        "warm_median_s": statistics.median(warm),
        "speedup": statistics.median(cold) / statistics.median(warm),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "warm_start.json").write_text(json.dumps(out, indent=1))
    print(f"server up in {server_s:.1f} s")
    print(
        f"inspect alone:         {' '.join(f'{s:.2f}' for s in cold)} s (median {out['cold_median_s']:.2f})"
    )
    print(
        f"inspect, server up:    {' '.join(f'{s:.2f}' for s in warm)} s (median {out['warm_median_s']:.2f})"
    )
    print(f"speed-up {out['speedup']:.1f}x, same output")


if __name__ == "__main__":
    main()
