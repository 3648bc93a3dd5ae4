"""Does the logit lens say what a latent does to the output? For random latents of a run's SAEs, the
tokens its logit lens promotes most against the tokens whose next-token probability turning it up
raises most, measured (`effects.output_effects`: its decoder direction added at its max activation
at every position after 8 neutral prompts, tokens ranked by probability ratio; what a feature page
shows as "measured output effects").

    python benchmarks/lens_outputs.py RUN [--sae ID ...] [--n 150] [--seed 0] [--out FILE]

Two lenses, the same top 10 each: "weights", `W_dec[i] @ W_U` (the output embedding alone), and
"folded", the tool's lens (`features.logit_lens`: the final norm's per-dimension gain folded into
`W_U`, `features.lens.output_directions`). Per SAE: the mean share of the measured top 10 that the lens's
top 10 holds, and the share of latents with at least 1 and at least 3 in common. Latents are drawn
among those of density 1e-4 to 5% in the run's feature index (the max activation is the strength).

Prints one table and writes JSON (default benchmarks/results/lens_outputs.json).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gemmascope.effects import output_effects
from gemmascope.features.lens import logit_lens, residual_directions
from gemmascope.opening import open_run
from gemmascope.sae import sae_site

TOP = 10


def measure(run: Any, key: str, n: int, seed: int) -> dict[str, Any]:
    """The two lenses against the measured output effects of `n` random latents of SAE `key`."""
    model, sae, index = run.model, run.saes[key], run.index()
    density, max_act = index.densities(key), index.column(key, "max_act")
    pool = [i for i in range(sae.d_sae) if 1e-4 <= float(density[i]) <= 0.05]
    latents = sorted(random.Random(seed).sample(pool, min(n, len(pool))))
    site = sae_site(model, sae, key)
    folded, _, _, _ = logit_lens(model, sae, site, TOP, latents=torch.tensor(latents))
    directions = residual_directions(model, sae, site)  # [d_sae, d_model]: through W_O for attn_out
    w_u = model.hf.get_output_embeddings().weight.detach()  # [vocab, d_model]
    rows = []
    for j, i in enumerate(tqdm(latents, desc=f"output effects of {key}", unit="latent")):
        measured = output_effects(model, sae, i, float(max_act[i]), top=TOP)
        rose = [r["token_id"] for r in measured["rose"]]
        weights = (w_u @ directions[i]).topk(TOP).indices.tolist()
        lenses = {"weights": weights, "folded": folded[j].tolist()}
        rows.append(
            {
                "latent": i,
                "measured": [r["token"] for r in measured["rose"]],
                **{name: model.tokenizer.convert_ids_to_tokens(ids) for name, ids in lenses.items()},
                **{f"shared_{name}": len(set(ids) & set(rose)) for name, ids in lenses.items()},
            }
        )
    summary = {
        name: {
            "mean_share": sum(r[f"shared_{name}"] for r in rows) / (TOP * len(rows)),
            "at_least_1": sum(r[f"shared_{name}"] >= 1 for r in rows) / len(rows),
            "at_least_3": sum(r[f"shared_{name}"] >= 3 for r in rows) / len(rows),
        }
        for name in ("weights", "folded")
    }
    return {"sae_id": key, "n": len(rows), "summary": summary, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--sae", action="append", help="SAE ids (or the unique front of one; default: every SAE)"
    )
    parser.add_argument("--n", type=int, default=150, help="random latents per SAE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lens_outputs.json"))
    args = parser.parse_args()
    run = open_run(args.run_dir, args.sae)
    started = time.monotonic()
    results = [measure(run, key, args.n, args.seed) for key in run.saes]
    print(f"\n{'sae':<30} {'lens':<8} {'mean share of the measured top 10':>34} {'>= 1':>6} {'>= 3':>6}")
    for res in results:
        for name, s in res["summary"].items():
            print(
                f"{res['sae_id']:<30} {name:<8} {s['mean_share']:>34.3f} {s['at_least_1']:>6.2f} {s['at_least_3']:>6.2f}"
            )
    out = {"run": str(args.run_dir), "top": TOP, "seconds": time.monotonic() - started, "saes": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(f"wrote {args.out} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
