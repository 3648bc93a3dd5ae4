"""Recipe variants on the quality benchmark's run folder, one SAE each, measured by the trainer on
held-out tokens (issue "SAEs worth reading"): the sweep behind the density limit and the decoder refit.

    python benchmarks/recipe_sweep.py '{"name": "limit10", "dense_density": 0.10}' \\
        '{"name": "matryoshka", "matryoshka": true}' --run-dir runs/bench_quality

Each variant is a JSON object: `name` (its checkpoint), optional `arch` (jumprelu, topk, batchtopk),
`tokens` (default 300,000), `site` (default resid_post.6), `matryoshka`, and any `TrainConfig` field.
The run folder must hold the harvest of `benchmarks/quality.py` (training and held-out activations).
Prints one JSON line per variant (held-out L0, FVU, dead, latents over 50% / 10% and the over-10%
latents' share of L0, seconds) and writes benchmarks/results/recipe_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from gemmascope.formats import load_sae
from gemmascope.train import TrainConfig, TrainSpec, train_saes

RESULTS = Path(__file__).parent / "results"


def run_variant(run_dir: Path, variant: dict[str, Any], width: int, l0: int) -> dict[str, Any]:
    kw = dict(variant)
    name, arch = kw.pop("name"), kw.pop("arch", "jumprelu")
    tokens, site = kw.pop("tokens", 300_000), kw.pop("site", "resid_post.6")
    matryoshka = bool(kw.pop("matryoshka", False))
    how = {"target_l0": l0} if arch == "jumprelu" else {"k": l0}
    spec = TrainSpec(site, width, arch, matryoshka=matryoshka, **how)  # type: ignore[arg-type]
    started = time.monotonic()
    [folder] = train_saes(run_dir, [spec], tokens, TrainConfig(name=name, **kw), progress=False)
    sae = load_sae(folder)
    density = 10 ** load_file(str(folder / "sparsity.safetensors"))["sparsity"]  # held-out, per latent
    total = float(density.sum())
    return {
        "variant": variant,
        "seconds": round(time.monotonic() - started),
        "measured_on": sae.cfg.extra["measured_on"],
        "l0": sae.cfg.extra["l0"],
        "fvu": sae.cfg.extra["fvu"],
        "dead": float((density < 1e-6).float().mean()),
        "over_50": int((density > 0.5).sum()),
        "over_10": int((density > 0.1).sum()),
        "l0_share_over_10": float(density[density > 0.1].sum()) / max(total, 1e-12),
        "folder": str(folder),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("variants", nargs="+", help="JSON objects, one per variant")
    parser.add_argument("--run-dir", default="runs/bench_quality")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--l0", type=int, default=45)
    parser.add_argument("--out", default="recipe_sweep")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for text in args.variants:
        rows.append(run_variant(Path(args.run_dir), json.loads(text), args.width, args.l0))
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
