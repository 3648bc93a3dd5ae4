"""Steering demonstration on a trained SAE: find a latent for a topic through the feature search,
steer with it, and show the default vs the steered completion of a few neutral prompts and the
next-token log-prob shift.

    python benchmarks/steer_demo.py runs/NAME/saes/resid_post/layer_6/width_4096/l0_52 \\
        [--index runs/NAME/features.sqlite] [--topic-text "..." --topic-token priest] [--latent N] \\
        [--mult 0.1 0.15 0.2] [--seed 0]

How the latent is found (unless --latent is given): `features.search_text` lists the latents that
fire most on the topic word inside a topical sentence, dense latents (density > --max-density, from
the run's feature index or a quick pass over held-out tokens) hidden. Each candidate steers the first
prompt at --mult[1] x its max activation, and is scored by the mean log-prob rise of its ten top
rising next tokens that are whole English words (a push towards real words, not noise). The best one
is shown at every multiple of its max activation in --mult.

Prints a Markdown section (for the README) and writes benchmarks/results/steer_demo.json.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from gemmascope.corpus import load_corpus, pack, special_mask
from gemmascope.features import FeatureIndex, logit_lens, search_text
from gemmascope.formats import load_sae, sae_id
from gemmascope.models import BUNDLED_MODEL, load_model
from gemmascope.sae import sae_site
from gemmascope.sites import capture
from gemmascope.steer import Intervention, generate_pair, logprob_shift

PROMPTS = [
    "I went for a walk this morning and",
    "The most interesting thing about my job is",
    "Yesterday my friend told me that",
]
TOPIC_TEXT = "The priest prayed in the church, and the congregation sang hymns to God during the holy mass."
TOPIC_TOKEN = "priest"
WORD = re.compile(r"^ [A-Za-z]{3,}$")  # a whole word: leading space, letters only


def latent_stats(model, sae, site, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max activation and density `[d_sae]` over `n_tokens` held-out tokens (specials excluded)."""
    rows = pack(
        model.tokenizer, load_corpus("wiki", "heldout"), context_len=128, max_rows=max(1, n_tokens // 128)
    )
    max_act = torch.zeros(sae.d_sae)
    fired = torch.zeros(sae.d_sae)
    n = 0
    for start in range(0, rows.shape[0], 8):
        ids = rows[start : start + 8]
        x = capture(model, ids, [site])[site]
        keep = ~special_mask(ids, model.special_token_ids)
        with torch.no_grad():
            f = sae.encode(x[keep])  # [tokens, d_sae]
        max_act = torch.maximum(max_act, f.max(0).values)
        fired += (f > 0).sum(0)
        n += f.shape[0]
    return max_act, fired / max(n, 1)


def word_push(shift: dict[str, Any], k: int = 10) -> float:
    """Mean log-prob rise of the `k` top rising tokens that are whole words (0 if none)."""
    rises = [r["delta"] for r in shift["rose"] if WORD.match(r["token"])][:k]
    return sum(rises) / k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sae", help="an SAE folder")
    ap.add_argument("--index", help="feature index (default: features.sqlite of the run holding the SAE)")
    ap.add_argument("--model", help="model (default: the SAE's)")
    ap.add_argument("--latent", type=int, help="steer this latent instead of searching")
    ap.add_argument(
        "--mult", type=float, nargs="+", default=[0.1, 0.15, 0.2], help="strengths as x max activation"
    )
    ap.add_argument("--topic-text", default=TOPIC_TEXT)
    ap.add_argument("--topic-token", default=TOPIC_TOKEN)
    ap.add_argument(
        "--tokens", type=int, default=8192, help="held-out tokens for stats when there is no index"
    )
    ap.add_argument("--max-density", type=float, default=0.01, help="hide latents denser than this")
    ap.add_argument("--shortlist", type=int, default=12, help="candidates whose steering effect is measured")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--freq-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/steer_demo.json")
    args = ap.parse_args()
    start = time.perf_counter()

    folder = Path(args.sae)
    sae = load_sae(folder)
    sid = sae_id(folder)
    model = load_model(args.model or sae.cfg.model_name or BUNDLED_MODEL)
    site = sae_site(model, sae)
    index_path = Path(args.index) if args.index else None
    if index_path is None:
        index_path = next(
            (p / "features.sqlite" for p in folder.resolve().parents if (p / "features.sqlite").is_file()),
            None,
        )
    index = None
    if index_path is not None:
        index = FeatureIndex(index_path)
        if sid not in {info["sae_id"] for info in index.saes()}:
            print(f"{sid} is not in {index_path}; computing stats from the corpus")
            index = None
    if index is not None:
        max_act, density = index.column(sid, "max_act").float(), index.densities(sid).float()
        stats_from = str(index_path)
    else:
        max_act, density = latent_stats(model, sae, site, args.tokens)
        stats_from = f"{args.tokens} held-out tokens"
    print(f"SAE {sid} at {site} (d_sae {sae.d_sae}); stats from {stats_from}")

    def lens_tokens(latents: torch.Tensor, k: int) -> list[list[int]]:
        ids, _, _, _ = logit_lens(model, sae, site, k=k, latents=latents)
        return ids.tolist()

    def words(ids: list[int]) -> list[str]:
        return [model.tokenizer.decode([i]) for i in ids]

    candidates: list[dict[str, Any]] = []
    if args.latent is not None:
        chosen = args.latent
    else:
        found = search_text(
            model,
            sae,
            args.topic_text,
            token=args.topic_token,
            limit=args.shortlist,
            densities=density,
            hide_dense=args.max_density,
        )
        mid = args.mult[len(args.mult) // 2]
        print(
            f"latents firing on {args.topic_token!r} in {args.topic_text!r}, steering at {mid:g} x max act:"
        )
        for hit in found:
            latent = hit["index"]
            if max_act[latent] <= 0:
                continue
            iv = Intervention(sae, latent, "add", float(mid * max_act[latent]))
            shift = logprob_shift(model, PROMPTS[0], [iv], k=40)
            row = {
                "latent": latent,
                "activation_on_token": hit["value"],
                "max_act": float(max_act[latent]),
                "density": float(density[latent]),
                "score": word_push(shift),
                "kl": shift["kl"],
                "rose": [r["token"] for r in shift["rose"][:8]],
            }
            candidates.append(row)
            print(f"  #{latent:>6} score {row['score']:6.2f}  KL {row['kl']:6.2f}  rose {row['rose']}")
        if not candidates:
            raise SystemExit(
                f"no latent fires on {args.topic_token!r}; pass --latent or another --topic-text"
            )
        candidates.sort(key=lambda c: -c["score"])
        chosen = candidates[0]["latent"]

    lens = words(lens_tokens(torch.tensor([chosen]), 10)[0])
    explanation = None
    if index is not None:
        page = index.feature(sid, chosen)
        explanation = (index.explanations(sid, chosen) or [{}])[0].get("explanation")
        print(f"feature page: density {page.get('density')}, max_act {page.get('max_act')}")
    print(
        f"\nchosen latent {sid}#{chosen}: max activation {float(max_act[chosen]):.4g}, density {float(density[chosen]):.3g}"
    )
    print(f"logit lens (promoted): {lens}")
    if explanation:
        print(f"explanation: {explanation}")

    sweep = []
    for mult in args.mult:
        strength = float(mult * max_act[chosen])
        iv = [Intervention(sae, chosen, "add", strength)]
        pairs = [
            generate_pair(
                model,
                prompt,
                iv,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                seed=args.seed,
                freq_penalty=args.freq_penalty,
            ).to_dict()
            for prompt in PROMPTS
        ]
        shift = logprob_shift(model, PROMPTS[0], iv, k=10)
        sweep.append({"mult": mult, "strength": strength, "pairs": pairs, "logprob_shift": shift})

    # Markdown for the README
    print(f"\n### Steering with {sid} latent {chosen}\n")
    print(f"Logit lens of the latent (tokens it promotes): {', '.join(repr(t) for t in lens)}.")
    if explanation:
        print(f"Explanation in the feature index: {explanation}.")
    print(
        f"Max activation {float(max_act[chosen]):.4g} (from {stats_from}); sampling: temperature {args.temperature:g}, "
        f"frequency penalty {args.freq_penalty:g}, seed {args.seed}, {args.max_new_tokens} new tokens.\n"
    )
    for row in sweep:
        print(f"**Strength {row['strength']:.4g} ({row['mult']:g} x max activation)**\n")
        print("| prompt | default | steered |\n|---|---|---|")
        for pair in row["pairs"]:
            cells = [pair["prompt"], pair["default"], pair["steered"]]
            print("| " + " | ".join(c.replace("\n", " ").replace("|", "/") for c in cells) + " |")
        shift = row["logprob_shift"]
        rose = ", ".join(f"{r['token']!r} {r['delta']:+.2f}" for r in shift["rose"][:8])
        fell = ", ".join(f"{r['token']!r} {r['delta']:+.2f}" for r in shift["fell"][:5])
        print(
            f"\nNext-token log-prob shift after {PROMPTS[0]!r} (KL {shift['kl']:.3f} nats): rose {rose}; fell {fell}.\n"
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "sae": str(folder),
        "sae_id": sid,
        "latent": chosen,
        "max_act": float(max_act[chosen]),
        "density": float(density[chosen]),
        "stats_from": stats_from,
        "sae_training": {
            k: sae.cfg.extra.get(k) for k in ("tokens", "l0", "fvu", "dead_fraction", "target_l0")
        },
        "logit_lens": lens,
        "explanation": explanation,
        "candidates": candidates[:20],
        "sweep": sweep,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
