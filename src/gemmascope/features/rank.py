"""Meaning first: the one ranking of a text's latents by how unusual each activation is for its
latent, not by its raw value (the microscope, `inspect`, the API, the document view).

A latent's firing over the index corpus is known from the feature index (`Firing`: how many of its
tokens it fired on and the histogram of the values it fired with). A token's latent then scores

    score = (q~ - 1/2) * log(1 / rho)

with `q` the share of the latent's own firings at or below this activation (its quantile, read off the
histogram), `rho = (n_fired + m) / (n_tokens + m)` its density and `q~ = (q * n_fired + m / 2) /
(n_fired + m)`: both smoothed by `m = PRIOR_FIRINGS` firings of an average latent, so a latent seen a
dozen times in the index (whose quantile and density are guesses, and which, in a dictionary trained
on little text, is often noise near its threshold) cannot lead on its rarity alone. The score is
positive where a latent fires above its typical (median) value, by as much as it is specific:
function-word and broad latents fire on several percent of tokens, so `log(1 / rho)` is small for
them, and a specific latent firing well above its median outranks one of them at its largest.

A whole text's topics pool the same scores: a latent's summed score over the text's kept positions.
On random text of the index corpus the sum is zero in expectation for every latent (firings as
often above the median as below); a latent firing strongly on several words of the text leads, one
that fires everywhere at its usual strength, or once, weakly, does not.

`ORDERS`: "meaning" (this ranking, the default everywhere) and "raw" (by activation value).
Knows tensors only: the index supplies `Firing` (`FeatureIndex.firing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from gemmascope.errors import ConfigError

Order = Literal["meaning", "raw"]
ORDERS: tuple[Order, ...] = ("meaning", "raw")
DEFAULT_ORDER: Order = "meaning"
PRIOR_FIRINGS = 100  # the m above: firings of an average latent each latent's statistics start from
RAW_NOTE = "raw activation order: no feature index gives this SAE's firing statistics ('gemmascope index' builds one)"


def check_order(order: str, what: str = "order") -> str:
    """`order` when it is one of `ORDERS`; else a ConfigError naming `what`."""
    if order not in ORDERS:
        raise ConfigError(f"{what} {order!r}: expected one of {', '.join(ORDERS)}")
    return order


@dataclass(frozen=True)
class Firing:
    """Each latent's firing over the index corpus: `n_tokens` tokens indexed, `n_fired [d_sae]` of
    them fired on, and the distribution of the values fired with, as its histogram's range
    `lo, hi [d_sae]` and cumulative shares at the bin edges `cdf [d_sae, n_bins + 1]` (0 then rising
    to 1; all zero for a latent that never fired). Float64, on the CPU."""

    n_tokens: int
    n_fired: Tensor
    lo: Tensor
    hi: Tensor
    cdf: Tensor

    @classmethod
    def from_histograms(cls, n_tokens: int, lo: Tensor, hi: Tensor, counts: Tensor) -> Firing:
        """From each latent's histogram of its non-zero values, `counts [d_sae, n_bins]` over equal
        bins of `[lo, hi]` (the feature index's pages)."""
        counts = counts.double()
        n_fired = counts.sum(1)
        edges = torch.cat([torch.zeros(len(counts), 1, dtype=torch.float64), counts.cumsum(1)], 1)
        cdf = edges / n_fired.clamp_min(1)[:, None]
        return cls(int(n_tokens), n_fired, lo.double(), hi.double(), cdf)

    @property
    def d_sae(self) -> int:
        return len(self.n_fired)


def quantiles(acts: Tensor, firing: Firing) -> Tensor:
    """`[..., d_sae] -> [..., d_sae]`: the share of each latent's firings in the index at or below
    each activation (linear within a histogram bin; 1 above its largest, 0 where it does not fire)."""
    _check(acts, firing)
    n_bins = firing.cdf.shape[1] - 1
    a = acts.double()
    span = firing.hi - firing.lo
    at = torch.where(span > 0, (a - firing.lo) / span.clamp_min(1e-30) * n_bins, (a >= firing.hi) * n_bins)
    at = at.clamp(0, n_bins)
    below = at.floor().clamp(max=n_bins - 1).long()
    frac = at - below
    cdf = firing.cdf.expand(*a.shape, n_bins + 1)
    q = (
        cdf.gather(-1, below[..., None])[..., 0] * (1 - frac)
        + cdf.gather(-1, below[..., None] + 1)[..., 0] * frac
    )
    return torch.where(a > 0, q, torch.zeros_like(q))


def _smoothed(firing: Firing, prior: float) -> tuple[Tensor, Tensor]:
    """Per latent `[d_sae]`: the weight of its own quantiles against the prior's, and `log(1 / rho)`
    of its smoothed density `rho`."""
    weight = firing.n_fired / (firing.n_fired + prior)
    rho = (firing.n_fired + prior) / (firing.n_tokens + prior)
    return weight, torch.log(1 / rho).clamp_min(0)


def meaning_scores(acts: Tensor, firing: Firing, prior: float = PRIOR_FIRINGS) -> Tensor:
    """`[..., d_sae] -> [..., d_sae]`: how unusual each activation is for its latent (the module's
    score: positive above the latent's median, negative below; 0 where it does not fire), float32."""
    weight, info = _smoothed(firing, prior)
    above = weight * (quantiles(acts, firing) - 0.5)  # q~ - 1/2
    return torch.where(acts > 0, above * info, torch.zeros_like(above)).float()


def topic_scores(acts: Tensor, keep: Tensor, firing: Firing, prior: float = PRIOR_FIRINGS) -> Tensor:
    """`acts [T, d_sae]`, `keep [T]` -> `[d_sae]`: each latent's meaning score summed over the kept
    positions (zero in expectation on random text; 0 for a latent that does not fire), float32."""
    return meaning_scores(acts[keep], firing, prior).sum(0)


def _check(acts: Tensor, firing: Firing) -> None:
    if acts.shape[-1] != firing.d_sae:
        raise ConfigError(
            f"latents of width {acts.shape[-1]} ranked with statistics of {firing.d_sae} latents"
        )
