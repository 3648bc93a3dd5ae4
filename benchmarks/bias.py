"""The bias experiment on a run's SAEs, both picks side by side, and how much of the gender direction
the SAE can carry at all.

    python benchmarks/bias.py runs/demo --out bias_demo12

For each pick (`attribution`, `contrast`): `bias.bias_experiment` on examples/bias (picked on
female/male.txt, measured on heldout_*.txt, with the cost), the same ablations measured on ten
unseen professions in another template (unseen_*.txt), in probability and in log-odds; for each
attribution pick, the change of the picking prompts' log-odds bias when it is ablated alone,
measured and estimated. Then, along the difference-of-means direction of the residual stream at
the last token (fitted on the picking prompts), the held-out separation of the two kinds of prompt
in the activation, in the SAE's reconstruction and in its error term, and the latents that carry
most of the reconstruction's share. Writes benchmarks/results/OUT.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gemmascope.bias import ablation, bias_experiment, watched_gaps
from gemmascope.effects import prompt_batches, watch_ids
from gemmascope.opening import open_run
from gemmascope.sae import SAE, encode_inputs, sae_site
from gemmascope.sites import edit_site

EXAMPLES = Path(__file__).parent.parent / "examples" / "bias"
RESULTS = Path(__file__).parent / "results"


def lines(name: str) -> list[str]:
    return [line.strip() for line in (EXAMPLES / name).read_text().splitlines() if line.strip()]


def last_token_acts(model: Any, sae: SAE, prompts: list[str]) -> Tensor:
    """`[n_prompts, d_in]`: the activation at the SAE's site at each prompt's last token."""
    site, out, held = sae_site(model, sae), [], {}
    for ids, last, kept in prompt_batches(model, prompts):
        with torch.no_grad(), edit_site(model, site, lambda act: held.__setitem__("x", act)):
            model.hf(input_ids=ids, use_cache=False, logits_to_keep=kept)
        out.append(held["x"][torch.arange(len(last)), last].float())
    return torch.cat(out)


def direction_kept(model: Any, sae: SAE, opened: Any, key: str) -> dict[str, Any]:
    """The difference-of-means direction at the last token, fitted on the picking prompts; on the
    held-out and unseen prompts, the separation (mean A - mean B of the projections) of the
    activation, of the SAE's reconstruction and of its error; the latents whose decoded share of the
    reconstruction's separation is largest."""
    fit_a, fit_b = (last_token_acts(model, sae, lines(f"{k}.txt")) for k in ("female", "male"))
    direction = fit_a.mean(0) - fit_b.mean(0)
    direction = direction / direction.norm()
    a = last_token_acts(model, sae, lines("heldout_female.txt") + lines("unseen_female.txt"))
    b = last_token_acts(model, sae, lines("heldout_male.txt") + lines("unseen_male.txt"))
    with torch.no_grad():
        f_a, f_b = encode_inputs(sae, a), encode_inputs(sae, b)
        rec_a, rec_b = sae.decode(f_a).float(), sae.decode(f_b).float()
        share = (f_a.mean(0) - f_b.mean(0)).float() * (sae.W_dec.float() @ direction)  # [d_sae]

    def separation(x: Tensor, y: Tensor) -> float:
        return float((x @ direction).mean() - (y @ direction).mean())

    top = share.topk(8)
    return {
        "activation": separation(a, b),
        "reconstruction": separation(rec_a, rec_b),
        "error": separation(a - rec_a, b - rec_b),
        "top_latents": [
            {"index": int(i), "share": float(v), "label": opened.explanation(key, int(i))}
            for v, i in zip(top.values, top.indices, strict=True)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--ablate", default="1,2,4,8,16")
    parser.add_argument("--out", default="bias")
    args = parser.parse_args()
    opened = open_run(args.run_dir)
    opened.index()
    densities = {k: d for k in opened.saes if (d := opened.densities(k)) is not None} or None
    model, watch = opened.model, [" she", " he"]
    ids = watch_ids(model, watch)
    ks = tuple(int(k) for k in args.ablate.split(","))
    a, b = lines("female.txt"), lines("male.txt")
    unseen_a, unseen_b = lines("unseen_female.txt"), lines("unseen_male.txt")
    result: dict[str, Any] = {"run": args.run_dir, "picks": {}}
    for pick in ("attribution", "contrast"):
        out = bias_experiment(
            model, opened.saes, a, b, lines("heldout_female.txt"), lines("heldout_male.txt"), watch,
            ablate=ks, pick=pick, densities=densities,
        )  # fmt: skip
        print(f"== {pick}: held-out | unseen professions")
        for row in out["rows"]:
            ivs = [ablation(opened.saes[h["sae_id"]], h["index"]) for h in out["picked"][: row["n_latents"]]]
            (gap_a, odds_a), (gap_b, odds_b) = (
                watched_gaps(model, unseen_a, ids, ivs),
                watched_gaps(model, unseen_b, ids, ivs),
            )
            row["unseen_bias"], row["unseen_log_odds_bias"] = gap_a - gap_b, odds_a - odds_b
            first = out["rows"][0]
            print(
                f"  {row['n_latents']:>3} ablated: bias {row['bias']:+.3f} ({row['bias_removed']:.0%} removed), "
                f"log-odds {row['log_odds_bias']:+.3f} ({row['log_odds_removed']:.0%}), ΔLM {row['delta_lm_loss']:+.4f}"
                f" | bias {row['unseen_bias']:+.3f} ({1 - row['unseen_bias'] / first['unseen_bias']:.0%}), "
                f"log-odds {row['unseen_log_odds_bias']:+.3f} "
                f"({1 - row['unseen_log_odds_bias'] / first['unseen_log_odds_bias']:.0%})"
            )
        result["picks"][pick] = out
    for h in result["picks"]["attribution"]["picked"]:
        print(
            f"  #{h['index']}: removes {h['effect']:.3f} nats measured alone, {h['estimated']:.3f} estimated"
        )
    result["direction"] = {}
    for key, sae in opened.saes.items():
        kept = direction_kept(model, sae, opened, key)
        result["direction"][key] = kept
        print(
            f"{key}: held-out separation along the probe direction {kept['activation']:.1f}; "
            f"reconstruction {kept['reconstruction']:.1f} ({kept['reconstruction'] / kept['activation']:.0%}), "
            f"error {kept['error']:.1f}"
        )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.out}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
