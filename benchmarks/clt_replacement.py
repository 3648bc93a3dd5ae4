"""A CLT against per-layer transcoders of the same harvest, tokens, width and target L0 (issue 30):
every MLP replaced at once (`evaluate_replacement`: ΔLM loss, KL, CE recovered on the same held-out
tokens), and each layer's held-out FVU and L0 from training.

    python benchmarks/clt_replacement.py runs/clt200 --tokens 200000 --width 1024 \
        --out benchmarks/results/clt_replacement.json

Harvests the 36 MLP sites (and 16k held-out tokens of them) when the run has none; training is
resumable and a finished run is not trained again (`train_saes`, `train_clt`), so a second call only
measures. As a user runs it: `gemmascope suite RUN --transcoders --clt --layers all ...`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gemmascope.activations import harvest
from gemmascope.evals.replacement import evaluate_replacement
from gemmascope.formats import load_sae
from gemmascope.formats.clt import load_clt
from gemmascope.models import load_model
from gemmascope.train import TrainConfig, TrainSpec, train_saes
from gemmascope.train.clt import CLTSpec, train_clt

HELDOUT_TOKENS = 16384
MEASURED = ("delta_lm_loss", "kl_div", "ce_recovered", "ce_loss_without", "n_predictions")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--tokens", type=int, default=200_000, help="training tokens (and the harvest's)")
    ap.add_argument("--width", type=int, default=1024, help="latents per layer, both")
    ap.add_argument("--l0", type=float, default=45.0, help="target L0 per layer, both")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens of the replacement")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/clt_replacement.json"))
    args = ap.parse_args()

    model = load_model("gemma-3-270m")
    n = model.n_layers
    sites = [f"{kind}.{layer}" for layer in range(n) for kind in ("mlp_in", "mlp_out")]
    started = time.perf_counter()
    if not (args.run / "activations").exists():
        harvest(model, sites, args.run, n_tokens=args.tokens, context_len=128)
    if not (args.run / "heldout").exists():
        harvest(model, sites, args.run / "heldout", n_tokens=HELDOUT_TOKENS, context_len=128, split="heldout")
    seconds = {"harvest": round(time.perf_counter() - started, 1)}

    started = time.perf_counter()
    per_layer = []
    for layer in range(n):  # one layer at a time, as the suite trains them (18 at once hold 18 GB)
        spec = TrainSpec(
            f"mlp_in.{layer}", args.width, target_l0=args.l0, out_site=f"mlp_out.{layer}", skip=True
        )
        config = TrainConfig(name=f"pl{args.width}_layer{layer}")
        per_layer += [load_sae(f) for f in train_saes(args.run, [spec], args.tokens, config, progress=False)]
    seconds["per_layer"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    clt = load_clt(train_clt(args.run, CLTSpec(width=args.width, target_l0=args.l0, tokens=args.tokens)))
    seconds["clt"] = round(time.perf_counter() - started, 1)

    torch.set_grad_enabled(False)
    results = {
        "run": str(args.run), "tokens": args.tokens, "width": args.width, "target_l0": args.l0,
        "seconds_to_train": seconds,
        "per_layer": {
            "fvu": [round(float(tc.cfg.extra["fvu"]), 4) for tc in per_layer],
            "l0": [round(float(tc.cfg.extra["l0"]), 1) for tc in per_layer],
        },
        "clt": {"fvu": clt.cfg.extra["heldout"]["fvu"], "l0": clt.cfg.extra["heldout"]["l0"]},
    }  # fmt: skip
    for key, dictionary in (("per_layer", per_layer), ("clt", clt)):
        replaced = evaluate_replacement(model, dictionary, n_tokens=args.eval_tokens)
        results[key] |= {k: replaced[k] for k in MEASURED}

    print("| every MLP replaced | per-layer transcoders | CLT |\n|---|---:|---:|")
    for k in MEASURED[:3]:
        print(f"| {k} | {results['per_layer'][k]:.3f} | {results['clt'][k]:.3f} |")
    print("| layer | per-layer FVU | CLT FVU | per-layer L0 | CLT L0 |\n|---:|---:|---:|---:|---:|")
    for layer in range(n):
        pl, c = results["per_layer"], results["clt"]
        print(
            f"| {layer} | {pl['fvu'][layer]:.3f} | {c['fvu'][layer]:.3f} | {pl['l0'][layer]:.1f} | {c['l0'][layer]:.1f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
