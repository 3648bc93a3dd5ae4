"""Contrastive feature search: given two sets of prompts (A and B), the latents that separate them
most, over every SAE given at once (Neuronpedia's "search via inference" over all layers).

Each prompt runs through the model once, every SAE reading its site from that pass (`encode.encode`:
BOS, EOS, pad and massive-activation positions left out), and each latent's activations are pooled over the
positions kept (`max`, `mean`: divided by the positions kept, or the `last` one kept). A latent's
separation is Cohen's d of the pooled values between the two sets, (mean_A − mean_B) / pooled
standard deviation, the deviation floored at 1% of the latent's largest pooled value so that a latent
firing on every A prompt and no B prompt ranks high rather than dividing by zero. Each result also
counts the prompts of each set it fires on. Latents denser than `hide_dense` on the corpus (from the
feature index's densities, when given; `encode.dense_latents`) are left out and counted.

Knows the model and the SAEs; knows nothing of the index file beyond the densities passed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gemmascope.errors import ConfigError
from gemmascope.features.encode import HIDE_DENSE, POOLS, dense_latents, encode
from gemmascope.limits import MAX_CONTRAST_PROMPTS, MAX_PROMPT_TOKENS, MIN_CONTRAST_PROMPTS
from gemmascope.models import LanguageModel
from gemmascope.sae import SAE

SD_FLOOR = 0.01  # of the latent's largest pooled value


def separation(a: Tensor, b: Tensor) -> Tensor:
    """Cohen's d per latent of `a [n_a, d_sae]` against `b [n_b, d_sae]`, the pooled standard
    deviation floored at SD_FLOOR of the latent's largest value (a latent silent in both: 0)."""
    n_a, n_b = a.shape[0], b.shape[0]
    var = ((n_a - 1) * a.var(0, unbiased=True) + (n_b - 1) * b.var(0, unbiased=True)) / (n_a + n_b - 2)
    top = torch.maximum(a.abs().max(0).values, b.abs().max(0).values)
    sd = torch.maximum(var.sqrt(), SD_FLOOR * top).clamp_min(1e-12)
    return (a.mean(0) - b.mean(0)) / sd


def check_sets(prompts_a: Sequence[str], prompts_b: Sequence[str]) -> None:
    """A ConfigError unless each set holds MIN_CONTRAST_PROMPTS to MAX_CONTRAST_PROMPTS non-empty
    prompts."""
    for name, prompts in (("A", prompts_a), ("B", prompts_b)):
        if isinstance(prompts, str) or not MIN_CONTRAST_PROMPTS <= len(prompts) <= MAX_CONTRAST_PROMPTS:
            got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise ConfigError(
                f"prompt set {name} has {got}: expected {MIN_CONTRAST_PROMPTS} to {MAX_CONTRAST_PROMPTS} prompts"
            )
        if any(not p.strip() for p in prompts):
            raise ConfigError(f"prompt set {name} has an empty prompt")


def contrast(
    model: LanguageModel,
    saes: Mapping[str, SAE],
    prompts_a: Sequence[str],
    prompts_b: Sequence[str],
    *,
    pool: str = "max",
    top: int = 20,
    densities: Mapping[str, Tensor] | None = None,
    hide_dense: float | None = HIDE_DENSE,
    max_tokens: int = MAX_PROMPT_TOKENS,
) -> dict[str, Any]:
    """The latents, over every SAE of `saes`, that fire more on `prompts_a` than on `prompts_b`,
    best first: `{"results": [{sae_id, index, effect, mean_a, mean_b, fired_a, fired_b, density}],
    "n_a", "n_b", "pool", "hidden_dense"}` (the number of latents left out for being denser than
    `hide_dense`). Swap the sets for the other direction."""
    check_sets(prompts_a, prompts_b)
    if not saes:
        raise ConfigError("no SAE to search: give at least one")
    if top < 1:
        raise ConfigError(f"top {top} must be at least 1")
    if pool not in POOLS:
        raise ConfigError(f"pool {pool!r}: expected one of {', '.join(POOLS)}")
    pooled_a = encode(model, saes, prompts_a, pool=pool, max_tokens=max_tokens).pooled[
        pool
    ]  # {id: [n_a, d_sae]}
    pooled_b = encode(model, saes, prompts_b, pool=pool, max_tokens=max_tokens).pooled[pool]
    hits: list[dict[str, Any]] = []
    hidden = 0
    for key in saes:
        a, b = pooled_a[key], pooled_b[key]
        effect = separation(a, b)
        density = None if densities is None else densities.get(key)
        dense = dense_latents(density, hide_dense)
        if dense is not None:
            hidden += int((dense & (effect > 0)).sum())
            effect = effect.masked_fill(dense, float("-inf"))
        values, latents = effect.topk(min(top, effect.numel()))
        for value, i in zip(values.tolist(), latents.tolist(), strict=True):
            if value <= 0:
                break
            hits.append(
                {
                    "sae_id": key,
                    "index": i,
                    "effect": value,
                    "mean_a": float(a[:, i].mean()),
                    "mean_b": float(b[:, i].mean()),
                    "fired_a": int((a[:, i] > 0).sum()),
                    "fired_b": int((b[:, i] > 0).sum()),
                    "density": None if density is None else float(density[i]),
                }
            )
    hits.sort(key=lambda h: h["effect"], reverse=True)
    return {
        "results": hits[:top],
        "n_a": len(prompts_a),
        "n_b": len(prompts_b),
        "pool": pool,
        "hidden_dense": hidden,
    }
