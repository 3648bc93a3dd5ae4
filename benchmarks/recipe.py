"""Recipe benchmark on the real model: does λ move L0, and does JumpReLU reach an FVU no worse than
TopK at matched L0 (Gemma Scope section 4's finding, RECIPE.md 4)?

    python benchmarks/recipe.py             # 200k harvested, 100k per SAE: about 25 min on 2 shared cores
    python benchmarks/recipe.py --tokens 900000 --train-tokens 2000000 --threads 2
        # the issue's size: every training token of the bundled corpus (932k), 2M steps x batch per SAE

Steps (each resumes if the run folder already holds it):
1. harvest `--tokens` activations of Gemma 3 270M at `--site` (train split of the bundled corpus) and
   `--heldout-tokens` of the held-out split into `RUN_DIR/heldout`;
2. train one JumpReLU SAE per λ in `--l0-coeffs` (width `--width`) from one pass over the store;
3. measure L0 and FVU of every saved SAE (scaling folded in, raw activations) on the held-out tokens;
4. train a TopK SAE on the same tokens (same seed, same batches) with k = the held-out L0 of the
   JumpReLU SAE picked by `--match` (the middle λ by default) and, in the same pass, a JumpReLU SAE
   in target-L0 mode with L0* = k (Gemma Scope 2), and measure them the same way.
Writes benchmarks/results/recipe.json (figures, command, sizes, times) and recipe.png (held-out L0 vs
FVU, and L0 during training for each λ).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gemmascope.activations import ActivationStore, harvest
from gemmascope.formats import load_sae
from gemmascope.models import load_model
from gemmascope.sae import SAE, massive_mask
from gemmascope.sites import parse_site
from gemmascope.train import PUBLISHED, TrainConfig, TrainSpec, read_training_log, train_saes

RESULTS = Path(__file__).parent / "results"


def heldout_activations(run_dir: Path, site: str) -> torch.Tensor:
    """Raw held-out activations `[tokens, d_in]`, special tokens (BOS, EOS, pad) dropped."""
    store = ActivationStore(run_dir)
    special = torch.tensor(sorted(store.special_ids))
    parts = [acts[~torch.isin(ids, special)] for acts, ids in store.rows(site)]
    return torch.cat(parts)


@torch.no_grad()
def measure(sae: SAE, x: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """L0 and FVU (Σ‖x − x̂‖² / Σ‖x − mean x‖²) of an SAE on raw activations `x [tokens, d_in]`,
    without the massive-activation tokens its training left out (`sae.massive_mask`), as evals do."""
    x = x[~massive_mask(sae, x)]
    l0 = sq_err = 0.0
    for start in range(0, len(x), chunk):
        xb = x[start : start + chunk]
        f = sae.encode(xb)
        l0 += float((f > 0).sum())
        sq_err += float((xb - sae.decode(f)).pow(2).sum())
    sq_dev = float((x - x.mean(0)).pow(2).sum())
    return {"l0": l0 / len(x), "fvu": sq_err / sq_dev, "tokens": len(x)}


def describe(folder: Path, x: torch.Tensor) -> dict[str, Any]:
    sae = load_sae(folder)
    extra = sae.cfg.extra
    return {
        "folder": str(folder),
        "architecture": extra.get("trained_as", sae.cfg.architecture),
        "l0_coeff": extra.get("l0_coeff"),
        "k": sae.cfg.k,
        "train_l0": extra["l0"],
        "train_fvu": extra["fvu"],
        "dead_fraction": extra["dead_fraction"],
        "heldout": measure(sae, x),
    }


def plot(results: dict[str, Any], logs: list[Path], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_front, ax_train) = plt.subplots(1, 2, figsize=(12, 4.8))
    jump = results["jumprelu"]
    ax_front.plot(
        [r["heldout"]["l0"] for r in jump],
        [r["heldout"]["fvu"] for r in jump],
        "o-",
        label="JumpReLU (λ sweep)",
    )
    for r in jump:
        ax_front.annotate(f"λ={r['l0_coeff']:g}", (r["heldout"]["l0"], r["heldout"]["fvu"]), fontsize=8)
    top = results["topk"]
    ax_front.plot(
        [top["heldout"]["l0"]], [top["heldout"]["fvu"]], "r*", markersize=14, label=f"TopK (k={top['k']})"
    )
    tgt = results["jumprelu_target_l0"]
    ax_front.plot(
        [tgt["heldout"]["l0"]], [tgt["heldout"]["fvu"]], "gs", label=f"JumpReLU, target L0 {tgt['target_l0']}"
    )
    ax_front.set_xscale("log")
    ax_front.set_xlabel("L0 (held-out)")
    ax_front.set_ylabel("FVU (held-out)")
    ax_front.set_title(
        f"{results['site']}, width {results['width']}, {results['train_tokens']:,} training tokens"
    )
    ax_front.grid(alpha=0.3)
    ax_front.legend()
    for log in logs:
        rows = list(read_training_log(log))
        for name in [k for k in rows[0] if k not in ("step", "tokens")]:
            ax_train.plot(
                [r["tokens"] for r in rows], [r[name]["l0"] for r in rows], label=name.split("/", 2)[-1]
            )
    ax_train.set_yscale("log")
    ax_train.set_xlabel("training tokens")
    ax_train.set_ylabel("L0 (training batches)")
    ax_train.grid(alpha=0.3)
    ax_train.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/bench_recipe")
    p.add_argument("--site", default="resid_post.6")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=200_000, help="activations harvested for training")
    p.add_argument(
        "--train-tokens", type=int, default=100_000, help="tokens per SAE (more than --tokens: epochs)"
    )
    p.add_argument("--heldout-tokens", type=int, default=16_384)
    p.add_argument("--l0-coeffs", default="3e-4,1e-3,3e-3", help="JumpReLU lambdas")
    p.add_argument("--match", type=int, default=1, help="index of the lambda whose L0 the TopK SAE matches")
    p.add_argument(
        "--k", type=int, help="TopK's k and the target L0 (default: the matched SAE's held-out L0)"
    )
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", action="store_true", help="the plain JumpReLU step (default: the fast one)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    run_dir = Path(args.run_dir)
    site = str(parse_site(args.site))
    coeffs = [float(c) for c in args.l0_coeffs.split(",")]
    train_tokens = args.train_tokens
    config = TrainConfig(seed=args.seed, fast=not args.reference)
    if args.batch_size:
        config.batch_size = args.batch_size
    if args.lr:
        config.lr = args.lr
    times: dict[str, float] = {}

    t = time.time()
    model = load_model("gemma-3-270m")
    harvest(model, [site], run_dir, args.tokens)
    harvest(model, [site], run_dir / "heldout", args.heldout_tokens, split="heldout")
    del model
    times["harvest_s"] = time.time() - t
    x_heldout = heldout_activations(run_dir / "heldout", site)

    t = time.time()
    specs = [TrainSpec(site, args.width, l0_coeff=c) for c in coeffs]
    config.name = "jumprelu"
    jump_dirs = train_saes(run_dir, specs, train_tokens, config)
    times["train_jumprelu_s"] = time.time() - t
    jumprelu = [describe(d, x_heldout) for d in jump_dirs]
    print(json.dumps(jumprelu, indent=1))

    t = time.time()
    k = args.k or max(1, round(jumprelu[args.match]["heldout"]["l0"]))
    config.name = f"topk_k{k}"
    phase2 = [TrainSpec(site, args.width, "topk", k=k), TrainSpec(site, args.width, target_l0=k)]
    topk_dir, target_dir = train_saes(run_dir, phase2, train_tokens, config)
    times["train_topk_and_target_s"] = time.time() - t
    topk = describe(topk_dir, x_heldout)
    target = {**describe(target_dir, x_heldout), "target_l0": k}

    matched = jumprelu[args.match]
    l0_gap = abs(matched["heldout"]["l0"] - topk["heldout"]["l0"]) / topk["heldout"]["l0"]
    l0s = [r["heldout"]["l0"] for r in jumprelu]
    results: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "model": "gemma-3-270m",
        "site": site,
        "width": args.width,
        "harvested_tokens": args.tokens,
        "train_tokens": train_tokens,
        "heldout_tokens": len(x_heldout),
        "epochs": load_sae(jump_dirs[0]).cfg.extra["epochs"],
        "settings": {
            "batch_size": config.batch_size,
            "lr": load_sae(jump_dirs[0]).cfg.extra["lr"],
            "lr_warmup_steps": load_sae(jump_dirs[0]).cfg.extra["lr_warmup_steps"],
            "l0_warmup_steps": load_sae(jump_dirs[0]).cfg.extra["l0_warmup_steps"],
            "bandwidth": config.bandwidth,
            "threshold_init": config.threshold_init,
            "fast_step": config.fast,
            "published": PUBLISHED.to_json(),
        },
        "jumprelu": jumprelu,
        "topk": topk,
        "jumprelu_target_l0": target,
        "checks": {
            "lambda_moves_l0": all(a > 1.2 * b for a, b in zip(l0s, l0s[1:], strict=False)),
            "matched_l0_within_10pct": l0_gap <= 0.10,
            "matched_l0_gap": l0_gap,
            "jumprelu_fvu_no_worse_than_topk": matched["heldout"]["fvu"] <= topk["heldout"]["fvu"],
            "fvu_jumprelu": matched["heldout"]["fvu"],
            "fvu_topk": topk["heldout"]["fvu"],
            "target_l0_reached_within_10pct": abs(target["heldout"]["l0"] - k) / k <= 0.10,
            "target_l0_jumprelu_fvu_no_worse_than_topk": target["heldout"]["fvu"] <= topk["heldout"]["fvu"],
        },
        "times": {**{k: round(v, 1) for k, v in times.items()}, "total_s": round(time.time() - started, 1)},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_end": os.getloadavg(),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recipe.json").write_text(json.dumps(results, indent=1) + "\n")
    logs = [run_dir / "report" / "jumprelu_log.jsonl", run_dir / "report" / f"topk_k{k}_log.jsonl"]
    plot(results, logs, RESULTS / "recipe.png")
    print(json.dumps(results["checks"], indent=1))
    print(f"wrote {RESULTS / 'recipe.json'} and {RESULTS / 'recipe.png'}")


if __name__ == "__main__":
    main()
