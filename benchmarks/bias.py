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

from gemmascope.bias import ablation, bias_experiment, watched_gaps
from gemmascope.effects import watch_ids
from gemmascope.opening import open_run

EXAMPLES = Path(__file__).parent.parent / "examples" / "bias"
RESULTS = Path(__file__).parent / "results"


def lines(name: str) -> list[str]:
    return [line.strip() for line in (EXAMPLES / name).read_text().splitlines() if line.strip()]


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
    result["direction"] = result["picks"]["attribution"]["direction"]
    for key, kept in result["direction"].items():
        print(
            f"{key}: held-out separation along the probe direction {kept['activation']:.1f}; "
            f"reconstruction {kept['reconstruction']:.1f} ({kept['kept']:.0%}), error {kept['error']:.1f}"
        )
        for c in kept["carriers"]:
            c["label"] = opened.explanation(key, c["index"])
            print(f"  #{c['index']} carries {c['separation']:.1f}: {c['label'][:100]}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.out}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
