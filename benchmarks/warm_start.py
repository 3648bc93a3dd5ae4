"""The command line's warm start: `gemmascope inspect`, `steer`, `contrast` (and `attribute` on a run
with transcoders) on a run alone (each loads the model, the SAEs and the index itself) against the
same command while `gemmascope serve` of that run is up (the server runs it with its model loaded,
`gemmascope.warm`), each timed as a new process, the way a researcher runs it.

    python benchmarks/warm_start.py runs/demo                          # inspect, steer, contrast
    python benchmarks/warm_start.py runs/tc --commands attribute --repeats 2

Starts `gemmascope serve RUN --port PORT` as a subprocess, waits for its health check, then alternates
cold (`GEMMASCOPE_NO_SERVER=1`: the command does not look for a server) and warm runs of each
command; checks that both print the same; stops the server. Prints a table and writes
benchmarks/results/warm_start[_NAME].json (wall seconds of each run, medians, their ratio, the
server's own start-up time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DEFAULT_COMMANDS = ["inspect", "steer", "contrast"]
TEXT = "Regulators back first jab against the common cold after large trial halves infections"


CONTRAST_A = [
    "The dog barked at the postman.",
    "Our puppy chewed the dog bed.",
    "The dogs ran across the park.",
]
CONTRAST_B = ["The meeting starts at nine.", "Prices rose again in March.", "She painted the kitchen blue."]


def commands(run: Path, text: str) -> dict[str, list[str]]:
    """Each command as a researcher types it about `run` (its first SAE where one is needed)."""
    from gemmascope.runs import find_saes, sae_id

    first = sae_id(sorted(find_saes(run))[0])
    run = run.resolve()  # a server prints the paths it was given made absolute
    contrast = [f for t in CONTRAST_A for f in ("--a", t)] + [f for t in CONTRAST_B for f in ("--b", t)]
    return {
        "inspect": ["inspect", "--run", str(run), text, "--color", "never"],
        "steer": ["steer", "--run", str(run), "--sae", first, "--feature", "0", "--strength", "50", text,
                  "--max-new-tokens", "20"],
        "contrast": ["contrast", str(run), *contrast],
        "attribute": ["attribute", str(run), "The opposite of hot is", "--slug", "warm_start_bench"],
    }  # fmt: skip


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
    p.add_argument(
        "--commands",
        type=lambda v: v.split(","),
        default=DEFAULT_COMMANDS,
        help="comma list (default inspect,steer,contrast)",
    )
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
        chosen = {
            name: [*gs, *argv]
            for name, argv in commands(args.run, args.text).items()
            if name in args.commands
        }
        times: dict[str, dict[str, list[float]]] = {name: {"cold": [], "warm": []} for name in chosen}
        for _ in range(args.repeats):
            for name, cmd in chosen.items():
                s, cold_out, cold_err = timed(cmd, {**env, "GEMMASCOPE_NO_SERVER": "1"})
                times[name]["cold"].append(s)
                s, warm_out, warm_err = timed(cmd, env)
                times[name]["warm"].append(s)
                same = _without_seconds(warm_out) == _without_seconds(cold_out)
                if "run by the running gemmascope serve" not in warm_err or not same:
                    raise SystemExit(
                        f"warm {name} did not ask the server or printed otherwise:\n{warm_err}\n{warm_out}"
                    )
    finally:
        server.terminate()
        server.wait(timeout=30)
    out = {
        "command": "python benchmarks/warm_start.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "server_start_s": server_s,
        "commands": {
            name: {
                "argv": shlex.join(chosen[name][2:]),
                "cold_s": t["cold"],
                "warm_s": t["warm"],
                "cold_median_s": statistics.median(t["cold"]),
                "warm_median_s": statistics.median(t["warm"]),
                "speedup": statistics.median(t["cold"]) / statistics.median(t["warm"]),
            }
            for name, t in times.items()
        },
    }
    RESULTS.mkdir(exist_ok=True)
    name = "warm_start" + ("" if args.commands == DEFAULT_COMMANDS else "_" + "_".join(args.commands))
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1))
    print(f"server up in {server_s:.1f} s")
    for name, row in out["commands"].items():
        print(
            f"{name:<10} alone {' '.join(f'{s:.2f}' for s in row['cold_s'])} s (median {row['cold_median_s']:.2f}); "
            f"server up {' '.join(f'{s:.2f}' for s in row['warm_s'])} s (median {row['warm_median_s']:.2f}): "
            f"{row['speedup']:.1f}x, same output"
        )


def _without_seconds(text: str) -> str:
    """The output with timings (e.g. attribute's "; 17.2 s") taken out: they differ run to run."""
    return re.sub(r"\d+(\.\d+)? s\b", "N s", text)


if __name__ == "__main__":
    main()
