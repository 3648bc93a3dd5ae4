"""Eval benchmark: cost of `gemmascope.evals.evaluate_tokens` on Gemma 3 270M against bare forward
passes over the same rows, with 1 and with several SAEs at one site.

An evaluation of K SAEs at one site needs 1 clean pass (which also records the site), 1 zero-ablation
pass and K spliced passes per batch, so its floor is (2 + K) bare passes. The benchmark reports the
ratio of the evaluation's time to that floor (the overhead of encoding, decoding and the KL / CE
arithmetic over the 262k-token vocabulary), and the marginal seconds per extra SAE.

    python benchmarks/evals.py                       # 1,024 tokens, 1 and 3 random SAEs of width 4096
    python benchmarks/evals.py --tokens 4096 --saes 1,4

CPU times are reported beside wall times: on a machine shared with other work the CPU ratio is the
steadier figure. Prints the figures and writes benchmarks/results/evals.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch

from gemmascope import evals
from gemmascope.corpus import special_mask
from gemmascope.models import load_model
from gemmascope.sae import JumpReLUSAE, SAEConfig

RESULTS = Path(__file__).parent / "results" / "evals.json"


def random_sae(d_in: int, width: int, site: str, seed: int) -> JumpReLUSAE:
    """A JumpReLU SAE with random unit-norm decoder rows and thresholds set for an L0 near 50."""
    gen = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(SAEConfig("jumprelu", d_in=d_in, d_sae=width, site=site, model_name="gemma-3-270m"))
    with torch.no_grad():
        w = torch.randn(width, d_in, generator=gen)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.threshold.fill_(1.0)
    return sae


def timed(fn: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--site", default="resid_post.6")
    parser.add_argument("--saes", default="1,3", help="numbers of SAEs evaluated together")
    args = parser.parse_args()

    model, load_s, _ = timed(lambda: load_model("gemma-3-270m"))
    token_ids = evals.eval_token_ids(model, args.tokens, context_len=args.context_len)
    n_eval = int((~special_mask(token_ids, model.special_token_ids)).sum())

    def bare() -> None:
        with torch.no_grad():
            for start in range(0, token_ids.shape[0], args.batch_size):
                model.hf(input_ids=token_ids[start : start + args.batch_size], use_cache=False)

    bare()  # warm-up
    _, bare_s, bare_cpu = timed(bare)
    out: dict[str, Any] = {
        "model": "gemma-3-270m",
        "site": args.site,
        "width": args.width,
        "context_len": args.context_len,
        "batch_size": args.batch_size,
        "n_tokens": n_eval,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.machine(),
        "model_load_s": round(load_s, 2),
        "bare_forward": {"seconds": round(bare_s, 3), "cpu_seconds": round(bare_cpu, 3)},
        "runs": [],
    }
    print(f"{n_eval} tokens; bare forward over them: {bare_s:.2f} s wall, {bare_cpu:.2f} s CPU")
    d_in = 640
    for k in [int(x) for x in args.saes.split(",")]:
        saes = {f"sae{i}": random_sae(d_in, args.width, args.site, seed=i) for i in range(k)}
        results, wall, cpu = timed(
            lambda saes=saes: evals.evaluate_tokens(
                model, saes, token_ids, batch_size=args.batch_size, min_tokens=min(1024, n_eval)
            )
        )
        floor = (2 + k) * bare_s
        floor_cpu = (2 + k) * bare_cpu
        run = {
            "n_saes": k,
            "seconds": round(wall, 3),
            "cpu_seconds": round(cpu, 3),
            "forward_passes": 2 + k,
            "ratio_to_bare_passes": round(wall / floor, 3),
            "cpu_ratio_to_bare_passes": round(cpu / floor_cpu, 3),
            "tokens_per_s_per_sae": round(n_eval * k / wall, 1),
            "l0": [round(evals.summary(r)["l0"], 1) for r in results],
        }
        out["runs"].append(run)
        print(
            f"{k} SAE(s): {wall:.2f} s wall ({run['ratio_to_bare_passes']:.2f}x of {2 + k} bare passes), "
            f"{cpu:.2f} s CPU ({run['cpu_ratio_to_bare_passes']:.2f}x); "
            f"{run['tokens_per_s_per_sae']:.0f} tokens/s per SAE"
        )
    if len(out["runs"]) >= 2:
        a, b = out["runs"][0], out["runs"][-1]
        marginal = (b["seconds"] - a["seconds"]) / (b["n_saes"] - a["n_saes"])
        out["marginal_seconds_per_sae"] = round(marginal, 3)
        out["marginal_in_bare_passes"] = round(marginal / bare_s, 3) if bare_s else math.nan
        print(f"each extra SAE: {marginal:.2f} s ({out['marginal_in_bare_passes']:.2f} bare passes)")
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
