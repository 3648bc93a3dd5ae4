"""Where does Gemma 3 270M hold the gender a profession implies? A difference-of-means probe of the
residual stream at the last token of each prompt, fitted on two prompt sets and scored on two held-out
ones, per layer (the README's bias experiment picks its SAE's layer by it).

    python benchmarks/pronoun_probe.py                  # examples/bias/*.txt, every other layer

For each layer: the unit direction mean(A) - mean(B) over the fitting prompts, the held-out
projections' separation (d' = difference of means / pooled spread) and the accuracy of the midpoint
threshold. Writes benchmarks/results/pronoun_probe.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gemmascope.models import load_model, prompt_tokens
from gemmascope.sites import Site, capture

EXAMPLES = Path(__file__).parent.parent / "examples" / "bias"


def lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default=str(EXAMPLES), help="folder with female/male/heldout_*.txt")
    parser.add_argument("--layers", default="0,2,4,6,8,10,12,14,16")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model("gemma-3-270m")
    folder = Path(args.prompts)
    sets = {k: lines(folder / f"{k}.txt") for k in ("female", "male", "heldout_female", "heldout_male")}
    sites = [Site("resid_post", int(layer)) for layer in args.layers.split(",")]
    last = {  # [n_prompts, n_sites, d_model]: the residual stream at each prompt's last token
        k: torch.stack(
            [
                torch.stack([acts[s][0, -1].float() for s in sites])
                for acts in (capture(model, prompt_tokens(model, p), sites) for p in prompts)
            ]
        )
        for k, prompts in sets.items()
    }
    rows = []
    for i, site in enumerate(sites):
        direction = last["female"][:, i].mean(0) - last["male"][:, i].mean(0)
        direction = direction / direction.norm()
        f, m = last["heldout_female"][:, i] @ direction, last["heldout_male"][:, i] @ direction
        spread = torch.cat([f - f.mean(), m - m.mean()]).std()
        cut = (f.mean() + m.mean()) / 2
        accuracy = float(((f > cut).float().mean() + (m <= cut).float().mean()) / 2)
        rows.append(
            {"site": str(site), "d_prime": float((f.mean() - m.mean()) / spread), "accuracy": accuracy}
        )
        print(f"{site}: held-out d' {rows[-1]['d_prime']:.2f}, accuracy {accuracy:.2f}")
    out = Path(__file__).parent / "results" / "pronoun_probe.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"sets": {k: len(v) for k, v in sets.items()}, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
