"""The detection arithmetic of `concepts.py`: the threshold of a latent's pooled activation with the
best F1 on the selection sentences, F1 at a threshold, the oracle (the best held-out F1 of any
latent, every threshold) and the detection's spread over resamples of the selection sentences
(`bootstrap_detection`). Tensors in, numbers out; knows no model.
"""

from __future__ import annotations

from typing import Any

import torch

from gemmascope.features.contrast import separation
from gemmascope.features.encode import HIDE_DENSE, dense_latents

F1_TARGET = 0.8
B_PER_CONCEPT = 12  # selection sentences of each other concept in the contrast's B set (at most 200 prompts)


def best_threshold(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """The activation threshold (fires when > it) with the best F1 of `pos` against `neg`."""
    candidates = torch.cat([torch.zeros(1), pos, neg]).unique()
    best, best_f1 = 0.0, -1.0
    for t in candidates.tolist():
        f1 = f1_score(pos, neg, t)
        if f1 > best_f1:
            best, best_f1 = t, f1
    return best


def oracle_f1(acts: torch.Tensor, is_pos: torch.Tensor) -> tuple[int, float]:
    """The latent of `acts [n, d_sae]` (pooled activations of n sentences) with the best F1 of
    `is_pos [n]` over every threshold of the form "fires when > t", and that F1: all latents at
    once, by sorting each column and counting the positives above every cut between distinct values."""
    values, order = acts.float().sort(dim=0, descending=True)  # [n, d]
    hits = is_pos[order].float().cumsum(0)  # [n, d] positives among the top k+1
    k = torch.arange(1, acts.shape[0] + 1, dtype=torch.float32)[:, None]  # predicted positives
    f1 = 2 * hits / (k + is_pos.sum())
    cut = torch.ones_like(values, dtype=torch.bool)
    cut[:-1] = values[:-1] > values[1:]  # a threshold can fall only between distinct values,
    cut[-1] = values[-1] > 0  # and is at least 0 (as `best_threshold`'s)
    f1 = torch.where(cut, f1, torch.zeros_like(f1)).amax(0)  # [d]
    best = int(f1.argmax())
    return best, float(f1[best])


def f1_score(pos: torch.Tensor, neg: torch.Tensor, threshold: float) -> float:
    tp = int((pos > threshold).sum())
    fp = int((neg > threshold).sum())
    fn = pos.numel() - tp
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def bootstrap_detection(
    pooled_sel: dict[str, torch.Tensor],
    pooled_held: dict[str, torch.Tensor],
    select_owner: list[str],
    heldout_owner: list[str],
    measured: list[str],
    densities: dict[str, torch.Tensor] | None,
    n: int,
    seed: int = 0,
) -> dict[str, Any]:
    """The detection (contrast pick, selection threshold, held-out F1) again on `n` resamples of the
    selection sentences (each concept's and the other ones drawn with replacement, same sizes; held-out
    fixed), the pick by the contrast search's own arithmetic (`separation`, dense latents hidden, best
    over the SAEs). Resample 0 is the sentences as written (its picks: `picks`). The detected count
    per resample, its mean and spread, and each concept's share of resamples detecting it."""
    gen = torch.Generator().manual_seed(seed)
    groups: dict[str, list[int]] = {}
    for i, owner in enumerate(select_owner):
        groups.setdefault(owner, []).append(i)
    hidden = {
        k: dense_latents(None if densities is None else densities.get(k), HIDE_DENSE) for k in pooled_sel
    }
    owner = [o for o, g in groups.items() for _ in g]  # every resample keeps each group's size and place
    is_pos_of = {name: torch.tensor([o == name for o in owner]) for name in measured}
    is_held_of = {name: torch.tensor([o == name for o in heldout_owner]) for name in measured}
    counts, detected = [], {name: 0 for name in measured}
    picks: dict[str, tuple[str, int]] = {}
    for b in range(n + 1):
        drawn = {o: g if b == 0 else [g[j] for j in torch.randint(len(g), (len(g),), generator=gen)]
                 for o, g in groups.items()}  # fmt: skip
        order = [i for g in drawn.values() for i in g]
        count = 0
        for name in measured:
            b_rows = [i for o, g in drawn.items() if o not in (name, "other") for i in g[:B_PER_CONCEPT]]
            b_rows += drawn.get("other", [])
            best = None
            for key, acts in pooled_sel.items():
                effect = separation(acts[drawn[name]], acts[b_rows])
                if hidden[key] is not None:
                    effect = effect.masked_fill(hidden[key], float("-inf"))
                value, latent = effect.max(0)
                if best is None or float(value) > best[0]:
                    best = (float(value), key, int(latent))
            assert best is not None
            _, key, latent = best
            if b == 0:
                picks[name] = (key, latent)
            sel = pooled_sel[key][order, latent]
            is_pos = is_pos_of[name]
            threshold = best_threshold(sel[is_pos], sel[~is_pos])
            held = pooled_held[key][:, latent]
            is_held = is_held_of[name]
            hit = f1_score(held[is_held], held[~is_held], threshold) >= F1_TARGET
            count += hit
            if b > 0:
                detected[name] += hit
        counts.append(count)
    resampled = torch.tensor(counts[1:], dtype=torch.float64)
    return {
        "n": n,
        "as_written": counts[0],
        "mean": float(resampled.mean()) if n else None,
        "sd": float(resampled.std()) if n > 1 else None,
        "counts": {c: counts[1:].count(c) for c in sorted(set(counts[1:]))},
        "detected_share": {name: detected[name] / n for name in measured} if n else {},
        "picks": {name: {"sae_id": k, "latent": i} for name, (k, i) in picks.items()},
    }
