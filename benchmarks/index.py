"""Feature-index benchmark: `gemmascope.features.build_index` for one 16,384-wide JumpReLU SAE at
resid_post.6 of Gemma 3 270M over the held-out Wikipedia slice: tokens/s end to end, the time of
each phase (corpus passes, logit lens + neighbours, writing), peak resident memory, and the same
tokens through a bare forward pass that stops after layer 6 for comparison.

    python benchmarks/index.py                       # 20,000 tokens, a trained SAE if runs/ has one
    python benchmarks/index.py --tokens 4096 --sae runs/demo/saes/resid_post/layer_6/width_16384/l0_60

The SAE is the first trained one found under runs/*/saes/resid_post/layer_6/width_16384 (or the one
given with --sae); without one it is freshly initialised the Gemma Scope way (W_dec rows of unit
norm, W_enc = W_dec^T, zero biases) with each latent's threshold set at its pre-activation quantile
on a calibration batch so that L0 is about --l0 (a trained SAE's sparsity, which is what decides
the cost). With a trained SAE it also prints three plainly interpretable latents with their top
windows. Prints the figures and writes benchmarks/results/index.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import torch

RESULTS = Path(__file__).parent / "results" / "index.json"
ROOT = Path(__file__).resolve().parent.parent


class PeakRSS:
    """Samples this process's resident memory in a thread; `peak_mb` is the maximum seen."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.start_mb = self.process.memory_info().rss / 2**20
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def find_trained_sae(width: int, layer: int) -> Path | None:
    from gemmascope.formats import find_saes

    for run in sorted((ROOT / "runs").glob("*")):
        for folder in find_saes(run):
            if f"resid_post/layer_{layer}/width_{width}/" in folder.as_posix() + "/":
                return folder
    return None


def fresh_sae(model: Any, width: int, layer: int, l0: int, seed: int) -> Any:
    """Gemma Scope init with thresholds at each latent's (1 - l0/width) pre-activation quantile."""
    from gemmascope.corpus import load_corpus, pack
    from gemmascope.sae import JumpReLUSAE, SAEConfig
    from gemmascope.sites import Site, capture

    d_in = model.d_model
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(
        SAEConfig("jumprelu", d_in=d_in, d_sae=width, site=f"resid_post.{layer}", model_name=model.name)
    )
    bound = (6 / d_in) ** 0.5
    w_dec = (torch.rand(width, d_in, generator=g) * 2 - 1) * bound
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    # calibration rows from the training split, so the index's held-out slice stays unseen
    rows = pack(model.tokenizer, load_corpus("wiki", "train"), context_len=128, max_rows=16)
    x = capture(model, rows, [Site("resid_post", layer)])[Site("resid_post", layer)][:, 1:].reshape(-1, d_in)
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.t())
        pre = x @ sae.W_enc
        sae.threshold.copy_(pre.quantile(1 - l0 / width, dim=0).clamp_min(1e-3))
    return sae


def interpretable(index: Any, sae_id: str, n: int = 3) -> list[dict[str, Any]]:
    """Latents that fire on one token in most of their top windows, neither rare nor dense."""
    scored = []
    density = index.densities(sae_id)
    for i in torch.nonzero((density > 2e-4) & (density < 0.02)).squeeze(1).tolist():
        f = index.feature(sae_id, i)
        focus = Counter(e["tokens"][e["focus"]].strip().lower() for e in f["top_examples"])
        if len(f["top_examples"]) < 10:
            continue
        token, count = focus.most_common(1)[0]
        scored.append((count / len(f["top_examples"]), token, i))
    picked, seen = [], set()
    for share, token, i in sorted(scored, reverse=True):
        if token in seen or not token.isalpha():
            continue
        seen.add(token)
        f = index.feature(sae_id, i)
        picked.append(
            {
                "index": i,
                "density": f["density"],
                "max_act": f["max_act"],
                "explanation": f["explanation"],
                "top_token_share": share,
                "top_windows": [
                    "".join(f"[[{t}]]" if j == e["focus"] else t for j, t in enumerate(e["tokens"])).replace(
                        "\n", " "
                    )
                    + f"  ({e['value']:.1f})"
                    for e in f["top_examples"][:5]
                ],
                "promoted": [p["token"] for p in f["logit_lens"]["promoted"][:5]],
            }
        )
        if len(picked) == n:
            break
    return picked


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--width", type=int, default=16_384)
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--l0", type=int, default=64, help="L0 of the freshly initialised SAE")
    parser.add_argument("--sae", help="an SAE folder to index instead of searching runs/")
    parser.add_argument("--batch-rows", type=int, default=8)
    parser.add_argument("--no-forward", action="store_true", help="skip the bare forward-pass comparison")
    parser.add_argument("--keep", help="copy the built features.sqlite here (default: discard it)")
    args = parser.parse_args()

    from gemmascope.corpus import token_rows
    from gemmascope.features import FeatureIndex, build_index
    from gemmascope.formats import load_sae, sae_id
    from gemmascope.models import load_model
    from gemmascope.sites import Site, capture

    t0 = time.perf_counter()
    model = load_model("gemma-3-270m")
    load_s = time.perf_counter() - t0
    folder = Path(args.sae) if args.sae else find_trained_sae(args.width, args.layer)
    if folder is not None:
        sae, key, source = load_sae(folder), sae_id(folder), f"trained: {folder}"
    else:
        sae = fresh_sae(model, args.width, args.layer, args.l0, seed=0)
        key = f"resid_post.{args.layer}.w{args.width}.fresh"
        source = f"freshly initialised (Gemma Scope init, thresholds for L0 ~ {args.l0}); no trained SAE under runs/"
    print(f"SAE {key} ({source}), d_sae {sae.d_sae}")

    forward: dict[str, Any] = {}
    if not args.no_forward:
        rows = token_rows(model.tokenizer, args.tokens, "wiki", "heldout", 128)
        site = Site("resid_post", args.layer)
        start = time.perf_counter()
        for i in range(0, len(rows), args.batch_rows):
            capture(model, rows[i : i + args.batch_rows], [site])
        seconds = time.perf_counter() - start
        forward = {"seconds": round(seconds, 2), "positions_per_s": round(rows.numel() / seconds, 1)}
        print(f"bare forward to layer {args.layer}: {rows.numel():,} positions in {seconds:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "features.sqlite"
        with PeakRSS() as rss:
            start = time.perf_counter()
            build_index(model, {key: sae}, db, n_tokens=args.tokens, batch_rows=args.batch_rows)
            seconds = time.perf_counter() - start
        index = FeatureIndex(db)
        stats = index.sae_info(key)["stats"]
        density = index.densities(key)
        examples = interpretable(index, key) if folder is not None else []
        db_mb = db.stat().st_size / 2**20
        if args.keep:
            import shutil

            shutil.copyfile(db, args.keep)

    result = {
        "sae": key,
        "sae_source": source,
        "d_sae": sae.d_sae,
        "site": f"resid_post.{args.layer}",
        "model": "gemma-3-270m",
        "n_tokens": stats["n_tokens"],
        "positions": stats["n_rows"] * stats["context_len"],
        "l0_on_index": round(float(density.sum()), 2),
        "live_latents": int((density > 0).sum()),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(stats["n_tokens"] / seconds, 1),
        "phases_s": {
            "first_pass": stats["first_pass_s"],
            "both_corpus_passes": stats["corpus_passes_s"],
            "logit_lens_and_neighbours": stats["weights_s"],
            "pages_and_writing": round(seconds - stats["corpus_passes_s"] - stats["weights_s"], 2),
        },
        "second_pass": stats["second_pass"],
        "peak_rss_mb": round(rss.peak_mb, 1),
        "rss_before_build_mb": round(rss.start_mb, 1),
        "peak_rss_increase_mb": round(rss.peak_mb - rss.start_mb, 1),
        "db_mb": round(db_mb, 1),
        "bare_forward": forward,
        "model_load_s": round(load_s, 1),
        "interpretable_latents": examples,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },
    }
    print(json.dumps({k: v for k, v in result.items() if k != "interpretable_latents"}, indent=2))
    for ex in examples:
        print(
            f"\nlatent {ex['index']}: density {ex['density']:.2e}, max {ex['max_act']:.1f}; {ex['explanation']}"
        )
        for w in ex["top_windows"]:
            print(f"    {w}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
