"""Feature pages from the build's accumulators: each latent's top and interval-sampled windows
(token strings and per-token activations, cut at the row's and the document's edges), its
histogram and intervals, logit-lens tokens and neighbours, as the JSON-ready dict the index stores.
The page's shape is defined here (TOP_K windows of ±WINDOW tokens, N_BINS bins, N_INTERVALS
intervals of PER_INTERVAL windows).

Knows the tokenizer (to show tokens) and the accumulators' fields; knows nothing of SQLite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gemmascope.features.stream import Pass1Stats, Pass2Stats
from gemmascope.models import LanguageModel, token_texts

TOP_K = 20  # top activating windows per latent
WINDOW = 8  # tokens each side of the activating one
N_BINS = 50
N_INTERVALS = 5
PER_INTERVAL = 5


def token_strings(model: LanguageModel, rows: Tensor) -> dict[int, str]:
    """Each token id in the rows, decoded alone (as the pages show it)."""
    return {int(i): model.tokenizer.decode([int(i)]) for i in rows.unique().tolist()}


def trim_bounds(rows: Tensor, token: Tensor, special: set[int]) -> tuple[Tensor, Tensor]:
    """For windows centred on flat token indices `token [m]`, the first and last offsets in
    `[-WINDOW, WINDOW]` of the stretch around the centre that stays in the row and in the same
    document (no BOS/EOS/pad inside)."""
    n_rows, ctx = rows.shape
    row, pos = token // ctx, token % ctx
    offsets = torch.arange(-WINDOW, WINDOW + 1)
    at = pos[:, None] + offsets
    inside = (at >= 0) & (at < ctx)
    ids = rows[row[:, None], at.clamp(0, ctx - 1)]
    stop = ~inside | torch.isin(ids, torch.tensor(sorted(special), dtype=ids.dtype))
    left_stops = torch.where(stop[:, :WINDOW], offsets[:WINDOW], -WINDOW - 1).max(1).values
    right_stops = torch.where(stop[:, WINDOW + 1 :], offsets[WINDOW + 1 :], WINDOW + 1).min(1).values
    return left_stops + 1, right_stops - 1


def window_tokens(
    rows: Tensor, centre: int, decode: dict[int, str], special: set[int], tokenizer: Any
) -> list[str]:
    """The tokens of the window around flat token index `centre`, trimmed to its document."""
    ctx = rows.shape[1]
    row, pos = centre // ctx, centre % ctx
    lo, hi = trim_bounds(rows, torch.tensor([centre]), special)
    return token_texts(tokenizer, rows[row, pos + int(lo) : pos + int(hi) + 1].tolist(), decode)


def _round_decimals(max_act: float) -> int:
    """Decimals that keep about 5 significant digits relative to a latent's max activation."""
    if max_act <= 0:
        return 4
    return int(min(8, max(0, 4 - math.floor(math.log10(max_act)))))


def _examples(
    rows: Tensor,
    token: Tensor,
    payload: Tensor,
    decode: dict[int, str],
    special: set[int],
    decimals: Tensor,
    tokenizer: Any,
) -> list[list[dict[str, Any]]]:
    """Windows `{tokens, acts, focus}` for entries `token [g, k]` (-1 empty) with activations
    `payload [g, k, 2 * WINDOW + 1]`, per group, strongest first; acts rounded per group."""
    g, k = token.shape
    live = token >= 0
    flat_token = token[live]
    lo, hi = trim_bounds(rows, flat_token, special)
    ctx = rows.shape[1]
    group_of = torch.arange(g)[:, None].expand(g, k)[live]
    payloads = _rounded(payload[live].double().numpy(), decimals[group_of].numpy())
    out: list[list[dict[str, Any]]] = [[] for _ in range(g)]
    row_ids = rows.tolist()
    for j, (t, a, b, grp) in enumerate(
        zip(flat_token.tolist(), lo.tolist(), hi.tolist(), group_of.tolist(), strict=True)
    ):
        r, p = divmod(t, ctx)
        ids = row_ids[r][p + a : p + b + 1]
        acts = payloads[j][WINDOW + a : WINDOW + b + 1]
        out[grp].append(
            {"tokens": token_texts(tokenizer, ids, decode), "acts": acts, "focus": -a, "value": acts[-a]}
        )
    for examples in out:
        examples.sort(key=lambda e: -e["value"])
    return out


def _rounded(payload: np.ndarray, decimals: np.ndarray) -> list[list[float]]:
    """`payload [m, w]` as lists, row j rounded to `decimals[j]` places (a call of `np.round` per
    distinct number of places, not per window)."""
    out = np.empty_like(payload)
    for d in np.unique(decimals).tolist():
        pick = decimals == d
        out[pick] = np.round(payload[pick], int(d))
    return out.tolist()


def feature_pages(
    p1: Pass1Stats,
    p2: Pass2Stats,
    n_tokens: int,
    rows: Tensor,
    decode: dict[int, str],
    lens: dict[str, list[Any]],
    model: LanguageModel,
    start: int,
    stop: int,
) -> Iterator[tuple[int, float, int, float, dict[str, Any]]]:
    """One `(index, density, n_fired, max_act, data)` row per latent `start..stop - 1`, `data` the
    rest of its feature page. `n_fired` is the histogram's total, so the counts add up to the
    density times the number of tokens by construction."""
    special = model.special_token_ids
    counts = p2.counts[start:stop].cpu()
    n_fired = counts.sum(1)
    max_act = p1.max_act[start:stop].cpu()
    decimals = torch.tensor([_round_decimals(float(m)) for m in max_act.tolist()])
    top = _examples(
        rows,
        p1.top.token[start:stop].cpu(),
        p1.top.payload[start:stop].cpu(),
        decode,
        special,
        decimals,
        model.tokenizer,
    )
    g0, g1 = start * N_INTERVALS, stop * N_INTERVALS
    samples = _examples(
        rows,
        p2.samples.token[g0:g1].cpu(),
        p2.samples.payload[g0:g1].cpu(),
        decode,
        special,
        decimals.repeat_interleave(N_INTERVALS),
        model.tokenizer,
    )
    lo, hi = p2.lo[start:stop].cpu().tolist(), p2.hi[start:stop].cpu().tolist()
    tok = lens_token(model, decode)
    for li in range(stop - start):
        i = start + li
        fired = int(n_fired[li])
        histogram, intervals = _histogram(
            fired, counts[li].tolist(), lo[li], hi[li], samples[li * N_INTERVALS : (li + 1) * N_INTERVALS]
        )
        data = {
            "min_act": lo[li] if fired else 0.0,
            "histogram": histogram,
            "top_examples": top[li],
            "intervals": intervals,
            **lens_entries(lens, i, tok),
        }
        yield i, fired / n_tokens, fired, float(max_act[li]), data


def _histogram(
    fired: int, c: list[int], lo: float, hi: float, samples: list[list[dict[str, Any]]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A latent's histogram `{edges, counts}` (N_BINS equal-width bins over [lo, hi]) and its
    N_INTERVALS intervals with their sampled windows (`samples`, one list per interval); both
    empty for a latent that never fired."""
    if not fired:
        return {"edges": [], "counts": []}, []
    per = N_BINS // N_INTERVALS
    edges = [lo + (hi - lo) * b / N_BINS for b in range(N_BINS + 1)]
    intervals = [
        {
            "lo": edges[j * per],
            "hi": edges[(j + 1) * per],
            "count": sum(c[j * per : (j + 1) * per]),
            "share": sum(c[j * per : (j + 1) * per]) / fired,
            "examples": samples[j],
        }
        for j in range(N_INTERVALS)
    ]
    return {"edges": edges, "counts": c}, intervals


def lens_token(model: LanguageModel, decode: dict[int, str]) -> Callable[[int], str]:
    """A token id's text for a page's lens: from `decode` (the corpus's tokens), else decoded once
    and kept there (logit-lens tokens need not occur in the corpus)."""

    def tok(i: int) -> str:
        if i not in decode:
            decode[i] = str(model.tokenizer.decode([i]))
        return decode[i]

    return tok


def lens_entries(lens: dict[str, list[Any]], i: int, tok: Any) -> dict[str, Any]:
    """Latent `i`'s logit lens (promoted and suppressed tokens, the promoted ones' `agreement`) and
    decoder neighbours."""
    return {
        "logit_lens": {
            "promoted": [
                {"token": tok(t), "value": round(v, 4)}
                for t, v in zip(lens["up_ids"][i], lens["up_vals"][i], strict=True)
            ],
            "suppressed": [
                {"token": tok(t), "value": round(v, 4)}
                for t, v in zip(lens["down_ids"][i], lens["down_vals"][i], strict=True)
            ],
            "agreement": round(lens["agreement"][i], 3),
        },
        "neighbours": [
            {"index": j, "cosine": round(c_, 4)}
            for j, c_ in zip(lens["nb_idx"][i], lens["nb_cos"][i], strict=True)
        ],
    }
