"""Streaming statistics of latent activations, with memory bounded by the SAE's width and never by
the corpus: per-latent counts, max and min, the top-k activating tokens, equal-width histograms,
uniform samples per activation interval, and correlations between the latents of two SAEs.

Every accumulator sees one batch of latent activations `acts [tokens, d_sae]` at a time (special
positions already zeroed). A latent "fires" on a token when its activation is > 0.

Pure tensor code: knows nothing of models, corpora, windows' text or SQLite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class KeepSmallest:
    """Per group, the `k` entries with the smallest keys seen so far, each with a token index and a
    payload row (here: the latent's activations in a window around the token).

    With key = -activation and one group per latent it keeps each latent's top-k activating tokens;
    with a uniform random key and one group per (latent, interval) it keeps a uniform random sample
    of k tokens per group without replacement (the k smallest of i.i.d. uniform keys). Ties keep
    the entry seen first. State: keys `[groups, k]` (+inf = empty), token `[groups, k]`, payload
    `[groups, k, payload_len]`."""

    def __init__(self, n_groups: int, k: int, payload_len: int, device: torch.device | str = "cpu") -> None:
        self.k = k
        self.keys = torch.full((n_groups, k), float("inf"), device=device)
        self.token = torch.full((n_groups, k), -1, dtype=torch.long, device=device)
        self.payload = torch.zeros(n_groups, k, payload_len, device=device)

    def update(
        self,
        groups: Tensor,
        keys: Tensor,
        token: Tensor,
        payload_of: Callable[[Tensor], Tensor],
    ) -> None:
        """Merge new candidates `groups [n]`, `keys [n]`, `token [n]` into the state.
        `payload_of(sel [m]) -> [m, payload_len]` gives the payload of the candidates `sel` (indices
        into the new ones) that survive; it is only called for those. Candidates whose key is not
        below their group's current k-th smallest are dropped first, and only the groups that still
        have candidates are re-sorted, so the cost follows the candidates, not the state."""
        k = self.k
        groups = groups.long()
        better = keys < self.keys[groups, -1]  # rows are kept sorted: [:, -1] is the worst kept
        index = better.nonzero().squeeze(1)  # candidates still in the running, as indices into the new ones
        if len(index) == 0:
            return
        touched, local = torch.unique(groups[index], return_inverse=True)  # [m] groups, [c] 0..m-1
        m = len(touched)
        old_keys = self.keys[touched].flatten()  # [m * k]
        old_slot = torch.isfinite(old_keys).nonzero().squeeze(1)  # live slots in [m * k]
        n_old = len(old_slot)
        all_keys = torch.cat([old_keys[old_slot], keys[index].float()])
        all_groups = torch.cat([old_slot // k, local])
        # sort by key, then stably by group: entries of a group are contiguous and ordered by key
        order = torch.argsort(all_keys, stable=True)
        order = order[torch.argsort(all_groups[order], stable=True)]
        sorted_groups = all_groups[order]
        first = torch.searchsorted(sorted_groups, sorted_groups)  # index of each group's first entry
        rank = torch.arange(len(order), device=order.device) - first
        keep = rank < k
        order, rank, sorted_groups = order[keep], rank[keep], sorted_groups[keep]

        new_keys = torch.full((m, k), float("inf"), device=self.keys.device)
        new_token = torch.full((m, k), -1, dtype=torch.long, device=self.keys.device)
        new_payload = torch.zeros(m, k, self.payload.shape[2], device=self.keys.device)
        new_keys[sorted_groups, rank] = all_keys[order]
        from_old = order < n_old
        if from_old.any():
            slot = old_slot[order[from_old]]
            old_token = self.token[touched].flatten()
            old_payload = self.payload[touched].flatten(0, 1)
            new_token[sorted_groups[from_old], rank[from_old]] = old_token[slot]
            new_payload[sorted_groups[from_old], rank[from_old]] = old_payload[slot]
        from_new = ~from_old
        if from_new.any():
            sel = index[order[from_new] - n_old]
            new_token[sorted_groups[from_new], rank[from_new]] = token[sel]
            new_payload[sorted_groups[from_new], rank[from_new]] = payload_of(sel)
        self.keys[touched], self.token[touched], self.payload[touched] = new_keys, new_token, new_payload


class Pass1Stats:
    """First pass over the index corpus: per latent, the number of tokens it fires on, its max and
    min non-zero activation, and its top-k activating tokens with a window of its activations
    around each."""

    def __init__(self, d_sae: int, top_k: int, window: int, device: torch.device | str = "cpu") -> None:
        self.n_tokens = 0
        self.n_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.max_act = torch.zeros(d_sae, device=device)
        self.min_act = torch.full((d_sae,), float("inf"), device=device)
        self.top = KeepSmallest(d_sae, top_k, 2 * window + 1, device)
        self.window = window

    def update(self, acts: Tensor, n_valid: int, token_base: int) -> None:
        """`acts [rows, ctx, d_sae]` of one batch, special positions zeroed; `n_valid` the number of
        non-special positions in it; `token_base` the global token index of its first position."""
        rows, ctx, d_sae = acts.shape
        flat = acts.reshape(rows * ctx, d_sae)
        position, latent = (flat > 0).nonzero(as_tuple=True)  # the batch's firings, [nnz] each
        value = flat[position, latent]
        self.n_tokens += n_valid
        self.n_fired += torch.bincount(latent, minlength=d_sae)
        self.max_act.scatter_reduce_(0, latent, value, "amax")
        self.min_act.scatter_reduce_(0, latent, value, "amin")
        self.top.update(
            latent,
            -value,
            token_base + position,
            lambda sel: windows_of(acts, position[sel], latent[sel], self.window),
        )


class Pass2Stats:
    """Second pass, once each latent's range [min_act, max_act] is known from the first: an
    equal-width histogram of its non-zero activations over that range, and a uniform random sample
    of tokens within each of `n_intervals` equal-width intervals of the same range (each interval
    is `n_bins / n_intervals` whole bins, so the interval shares follow from the histogram)."""

    def __init__(
        self,
        min_act: Tensor,
        max_act: Tensor,
        n_bins: int,
        n_intervals: int,
        per_interval: int,
        window: int,
        seed: int,
    ) -> None:
        if n_bins % n_intervals:
            raise ValueError(f"n_bins={n_bins} must be a multiple of n_intervals={n_intervals}")
        d_sae = len(max_act)
        self.lo, self.hi = histogram_range(min_act, max_act)
        self.n_bins, self.n_intervals = n_bins, n_intervals
        device = max_act.device
        self.counts = torch.zeros(d_sae, n_bins, dtype=torch.long, device=device)
        self.samples = KeepSmallest(d_sae * n_intervals, per_interval, 2 * window + 1, device)
        self.window = window
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def update(self, acts: Tensor, token_base: int) -> None:
        """`acts [rows, ctx, d_sae]` of the same batch as in the first pass."""
        rows, ctx, d_sae = acts.shape
        flat = acts.reshape(rows * ctx, d_sae)
        position, latent = (flat > 0).nonzero(as_tuple=True)
        value = flat[position, latent]
        b = bin_index(value, self.lo[latent], self.hi[latent], self.n_bins)
        self.counts += torch.bincount(latent * self.n_bins + b, minlength=d_sae * self.n_bins).view(
            d_sae, self.n_bins
        )
        interval = b // (self.n_bins // self.n_intervals)
        keys = torch.rand(len(value), generator=self.generator, device=acts.device)
        self.samples.update(
            latent * self.n_intervals + interval,
            keys,
            token_base + position,
            lambda sel: windows_of(acts, position[sel], latent[sel], self.window),
        )


def histogram_range(min_act: Tensor, max_act: Tensor) -> tuple[Tensor, Tensor]:
    """`[d_sae]` lower and upper histogram edges: the non-zero activations' min and max, widened to
    a small positive width where they are equal (a latent that fired at one value) and set to
    [0, 1] for latents that never fired."""
    dead = ~torch.isfinite(min_act) | (max_act <= 0)
    lo = torch.where(dead, 0.0, min_act)
    hi = torch.where(dead, 1.0, max_act)
    width = torch.maximum(hi - lo, 1e-6 * hi.abs().clamp_min(1.0))
    return lo, lo + width


def bin_index(value: Tensor, lo: Tensor, hi: Tensor, n_bins: int) -> Tensor:
    """Equal-width bin of each value in [lo, hi] (elementwise); values at or beyond the edges go to
    the first or last bin."""
    b = ((value - lo) / (hi - lo) * n_bins).floor().long()
    return b.clamp_(0, n_bins - 1)


def windows_of(acts: Tensor, position: Tensor, latent: Tensor, window: int) -> Tensor:
    """`[m, 2 * window + 1]`: latent `latent[i]`'s activations at the positions `window` before to
    `window` after flat position `position[i]` of `acts [rows, ctx, d_sae]`, within its row (zero
    beyond the row's ends)."""
    rows, ctx, _ = acts.shape
    row, pos = position // ctx, position % ctx
    at = pos[:, None] + torch.arange(-window, window + 1, device=acts.device)
    inside = (at >= 0) & (at < ctx)
    values = acts[row[:, None], at.clamp(0, ctx - 1), latent[:, None]]
    return values * inside


# ---------------------------------------------------------------------------------------------
# Cross-layer correlations


class SparseSample:
    """The non-zero activations `[tokens, d_sae]` of one SAE over a fixed sample of tokens (the
    first `max_tokens` non-special index tokens), kept sparse; it stops growing once it holds
    `max_entries` non-zeros so a dense SAE cannot exhaust memory. Every SAE of one build sees the
    same token sample up to the first one that stops."""

    def __init__(self, d_sae: int, max_tokens: int, max_entries: int) -> None:
        self.d_sae = d_sae
        self.max_tokens, self.max_entries = max_tokens, max_entries
        self.n_tokens = 0
        self.full = False
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self.n_entries = 0

    def update(self, acts: Tensor) -> None:
        """`acts [n, d_sae]`: the next tokens' activations (special positions already dropped)."""
        if self.full:
            return
        acts = acts[: self.max_tokens - self.n_tokens]
        token, latent = (acts > 0).nonzero(as_tuple=True)
        if self.n_entries + len(token) > self.max_entries:
            self.full = True
            return
        self.parts.append((token + self.n_tokens, latent, acts[token, latent]))
        self.n_entries += len(token)
        self.n_tokens += len(acts)
        self.full = self.n_tokens >= self.max_tokens

    def matrix(self, n_tokens: int) -> Tensor:
        """The sample as a sparse COO tensor `[n_tokens, d_sae]` (its first `n_tokens` rows)."""
        if self.parts:
            token, latent, value = (torch.cat(p) for p in zip(*self.parts, strict=True))
        else:
            token = latent = torch.zeros(0, dtype=torch.long)
            value = torch.zeros(0)
        keep = token < n_tokens
        index = torch.stack([token[keep], latent[keep]])
        return torch.sparse_coo_tensor(
            index, value[keep], (n_tokens, self.d_sae), check_invariants=False
        ).coalesce()


def top_correlations(a: Tensor, b: Tensor, k: int, chunk_entries: int = 1 << 24) -> tuple[Tensor, ...]:
    """Pearson correlations between the columns of two activation matrices over the same tokens,
    `a [n, d_a]` and `b [n, d_b]` (CPU tensors, sparse COO or dense), computed exactly, `b`'s columns
    a chunk at a time so at most `chunk_entries` correlations are in memory. Returns, for each latent
    of `a`, the `k` latents of `b` with the highest correlation (`a_index [d_a, k]`, `a_corr [d_a,
    k]`) and the same for each latent of `b` over `a` (`b_index [d_b, k]`, `b_corr [d_b, k]`).
    Latents that never vary over the sample have no correlations: their slots hold index -1 and corr
    -inf. With each column scaled by its spread, corr = aᵀb / (n σ_a σ_b) − (μ_a/σ_a)(μ_b/σ_b)ᵀ, the
    first term by scipy's sparse-times-sparse product in float64: Σ over tokens of L0_a·L0_b
    multiply-adds, where aᵀ times dense columns of b costs nnz(a)·d_b (at width 4,096 over 8,192
    tokens 1.6 -> 0.7 s a pair; split over threads it was slower)."""
    n, d_a = a.shape
    d_b = b.shape[1]
    a_mean, a_std = _column_moments(a)
    b_mean, b_std = _column_moments(b)
    a_scale = torch.where(a_std > 0, 1 / (n * a_std), 0)
    b_scale = torch.where(b_std > 0, 1 / b_std, 0)
    a_t, b_cols = _scipy_csr(a, a_scale, transpose=True), _scipy_csr(b, b_scale).tocsc()
    a_shift, b_shift = a_mean * a_scale * n, b_mean * b_scale  # μ/σ
    k_a, k_b = min(k, d_b), min(k, d_a)
    a_corr = torch.full((d_a, k_a), -torch.inf)
    a_index = torch.full((d_a, k_a), -1, dtype=torch.long)
    b_corr = torch.full((d_b, k_b), -torch.inf)
    b_index = torch.full((d_b, k_b), -1, dtype=torch.long)
    step = max(1, chunk_entries // max(d_a, 1))
    for start in range(0, d_b, step):
        stop = min(d_b, start + step)
        corr = torch.from_numpy((a_t @ b_cols[:, start:stop].tocsr()).toarray())  # [d_a, c] float64
        corr = corr.addr_(a_shift, b_shift[start:stop], alpha=-1).float()
        corr[~(a_std > 0)] = -torch.inf  # never varies (or no tokens: NaN)
        corr[:, ~(b_std[start:stop] > 0)] = -torch.inf
        # running top-k over b for each latent of a
        cand_corr = torch.cat([a_corr, corr], dim=1)
        cand_index = torch.cat([a_index, torch.arange(start, stop).expand(d_a, -1)], dim=1)
        a_corr, pick = cand_corr.topk(k_a, dim=1)
        a_index = cand_index.gather(1, pick)
        # complete top-k over a for each latent of b in this chunk
        top = corr.t().contiguous().topk(k_b, dim=1)
        b_corr[start:stop] = top.values
        b_index[start:stop] = top.indices
    a_index[~torch.isfinite(a_corr)] = -1
    b_index[~torch.isfinite(b_corr)] = -1
    return a_index, a_corr, b_index, b_corr


def _scipy_csr(m: Tensor, column_scale: Tensor, transpose: bool = False) -> Any:
    """`m [n, d]` (sparse COO or dense) with each column times `column_scale [d]`, or its transpose,
    as a float64 scipy CSR matrix."""
    import scipy.sparse  # imported here: only the index's flow needs it

    m = m.detach().cpu()
    m = (m if m.is_sparse else m.to_sparse()).coalesce()
    rows, cols = m.indices()
    value = m.values().double() * column_scale.double()[cols]
    shape = tuple(m.shape)
    if transpose:
        rows, cols, shape = cols, rows, shape[::-1]
    return scipy.sparse.csr_matrix((value.numpy(), (rows.numpy(), cols.numpy())), shape=shape)


def _column_moments(m: Tensor) -> tuple[Tensor, Tensor]:
    """Per column mean and (population) standard deviation `[d]` (float64) of `m [n, d]`, sparse or
    dense."""
    n, d = m.shape
    if m.is_sparse:  # sums over the stored entries by column (float64)
        m = m.coalesce()
        column, value = m.indices()[1], m.values().double()
        s = torch.bincount(column, weights=value, minlength=d)
        sq = torch.bincount(column, weights=value * value, minlength=d)
    else:
        s, sq = m.double().sum(0), m.double().square().sum(0)
    mean = s / n
    var = (sq / n - mean * mean).clamp_min(0)
    return mean, var.sqrt()
