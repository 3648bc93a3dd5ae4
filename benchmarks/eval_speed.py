"""Evaluation speed (issue "Faster than sparsify"): `gemmascope eval` of a run's SAEs on the same
held-out tokens by the code of today and by the code of an earlier commit (default: the one before
the evaluation's speed work), each in a fresh process on the same machine, one after the other;
wall seconds, their ratio, and whether every figure agrees (to 1e-4).

    python benchmarks/eval_speed.py RUN [--n-tokens 16384] [--before COMMIT]

The earlier code runs from a git worktree of COMMIT (`PYTHONPATH` pointed at its src/), reading the
same run folder (`--no-write`: neither writes into it). Writes benchmarks/results/eval_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BEFORE = "96b7b22~1"  # the code before "evals: edited passes resume after the layers no edit touches"
FIELDS = (
    "l0",
    "fvu",
    "delta_lm_loss",
    "ce_loss_score",
    "kl_div_with_sae",
    "frac_dead",
    "frac_dense",
    "n_tokens",
)


def run_eval(src: Path, run: Path, n_tokens: int) -> tuple[float, list[dict[str, Any]]]:
    """Wall seconds of `gemmascope eval` with the package from `src` and its per-SAE results."""
    cmd = [
        sys.executable, "-m", "gemmascope.cli", "eval", str(run), "--n-tokens", str(n_tokens),
        "--no-probe", "--no-write", "--json",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(src), "GEMMASCOPE_NO_SERVER": "1"}
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} (PYTHONPATH={src}) failed:\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout)["summary"]


def figures(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Every SAE's figures of FIELDS that it reports, by SAE id."""
    out = {}
    for row in rows:
        key = str(row["sae_id"])
        out[key] = {f: float(row[f]) for f in FIELDS if isinstance(row.get(f), (int, float))}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--n-tokens", type=int, default=16384)
    p.add_argument("--before", default=BEFORE, help=f"the earlier commit (default {BEFORE})")
    args = p.parse_args()
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", args.before],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True)
        try:
            before_s, before_rows = run_eval(tree / "src", args.run, args.n_tokens)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)
    now_s, now_rows = run_eval(REPO / "src", args.run, args.n_tokens)
    old, new = figures(before_rows), figures(now_rows)
    worst = max(
        (abs(old[k][f] - new[k][f]) for k in new if k in old for f in new[k] if f in old[k]),
        default=float("nan"),
    )
    out = {
        "command": "python benchmarks/eval_speed.py " + shlex.join(sys.argv[1:]),
        "before": commit,
        "n_tokens": args.n_tokens,
        "before_s": before_s,
        "now_s": now_s,
        "speedup": before_s / now_s,
        "max_abs_difference": worst,
        "before_figures": old,
        "now_figures": new,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "eval_speed.json").write_text(json.dumps(out, indent=1))
    print(
        f"gemmascope eval {args.run} --n-tokens {args.n_tokens}: code of {commit} {before_s:.1f} s, today {now_s:.1f} s"
    )
    print(f"speed-up {before_s / now_s:.2f}x; largest difference of any figure {worst:.2e}")
    for key, row in new.items():
        print(
            f"  {key}: "
            + ", ".join(
                f"{f} {v:.4f} (was {old.get(key, {}).get(f, float('nan')):.4f})" for f, v in row.items()
            )
        )


if __name__ == "__main__":
    main()
