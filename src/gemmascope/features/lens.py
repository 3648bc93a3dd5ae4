"""What an SAE's weights say about each latent, without any text: the logit lens (the decoder
direction read out as the output reads the residual stream, through the final norm's gain and the
unembedding: the tokens a latent promotes and suppresses) and the nearest latents by decoder cosine
similarity.

Knows the model only through its final norm's gain, its unembedding and, for `attn_out` sites, the
attention output projection that maps the heads' concatenated outputs into the residual stream.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from gemmascope.models import LanguageModel, final_norm_gain
from gemmascope.sae import SAE
from gemmascope.sites import Site

_CHUNK_ENTRIES = 1 << 24  # decoder cosines held at once (64 MiB of fp32)
# The logit lens: a block of latents times a block of the vocabulary a product, each block's top-k
# kept (at width 4,096, 64 latents times the whole vocabulary took 14 s; these blocks 9.5 s)
_LENS_ROWS, _LENS_BLOCK = 512, 8192


def unembedding(model: LanguageModel) -> Tensor:
    """`[d_model, vocab]`: the model's unembedding `W_U` (the transposed output embedding, a view)."""
    return model.hf.get_output_embeddings().weight.detach().t()


def output_directions(model: LanguageModel, sae: SAE, site: Site) -> Tensor:
    """`[d_sae, d_model]`: each latent's residual direction as the output layer reads it, times the
    final norm's per-dimension gain `g` (`models.final_norm_gain`), so that its product with `W_U` is
    `W_dec[i] @ diag(g) W_U` (TransformerLens folds its ln_final weights the same way; folded into
    the directions, not into the 262k-column `W_U`). Gemma 3's final norm multiplies some dimensions
    by up to 301 and others by under 1, so `W_dec @ W_U` alone ranks tokens by dimensions the output
    barely reads: measured against what turning a latent up does to the next token
    (`benchmarks/lens_outputs.py`), the folded lens agrees about twice as often."""
    directions = residual_directions(model, sae, site)
    return directions * final_norm_gain(model.hf).to(directions)


def residual_directions(model: LanguageModel, sae: SAE, site: Site) -> Tensor:
    """`[d_sae, d_model]`: each latent's decoder direction in the residual stream. For `attn_out`
    (the heads' outputs before `o_proj`) that is `W_dec @ W_O^T`; other sites already live in the
    residual stream's space (`mlp_in` is the normalised MLP input: read as is)."""
    w_dec = sae.W_dec.detach()
    if site.kind == "attn_out":
        block: Any = model.layers[site.layer]
        o_proj = block.self_attn.o_proj.weight.detach()  # [d_model, heads * d_head]
        return w_dec @ o_proj.t()
    return w_dec


def logit_lens(
    model: LanguageModel,
    sae: SAE,
    site: Site,
    k: int = 10,
    latents: Tensor | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The logit lens of latents (all by default, else `latents [n]`): `W_dec[i] @ diag(g) W_U`
    (`output_directions`; through `W_O` for `attn_out`), computed exactly, a block of latents times a
    block of the vocabulary at a time.
    Returns the top-k promoted token ids and values `[n, k]` and the top-k suppressed token ids and
    values `[n, k]` (most negative first)."""
    directions = output_directions(model, sae, site)
    if latents is not None:
        directions = directions[latents]
    w_u = unembedding(model).to(directions.dtype)
    n, vocab = directions.shape[0], w_u.shape[1]
    k = min(k, vocab)
    up_ids, up_vals, down_ids, down_vals = [], [], [], []
    with torch.no_grad():
        for start in tqdm(range(0, n, _LENS_ROWS), desc="logit lens", unit="chunk", disable=not progress):
            rows = directions[start : start + _LENS_ROWS]
            ups, downs = [], []  # each vocabulary block's top-k, then the top-k of those
            for first in range(0, vocab, _LENS_BLOCK):
                logits = rows @ w_u[:, first : first + _LENS_BLOCK]  # [rows, block]
                kb = min(k, logits.shape[1])
                ups.append(_offset(logits.topk(kb, dim=1), first))
                downs.append(_offset(logits.topk(kb, dim=1, largest=False), first))
            ids, vals = _merge(ups, k, largest=True)
            up_ids.append(ids)
            up_vals.append(vals)
            ids, vals = _merge(downs, k, largest=False)
            down_ids.append(ids)
            down_vals.append(vals)
    if not up_ids:
        empty_ids, empty_vals = torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
        return empty_ids, empty_vals, empty_ids, empty_vals
    return torch.cat(up_ids), torch.cat(up_vals), torch.cat(down_ids), torch.cat(down_vals)


def _offset(top: torch.return_types.topk, first: int) -> tuple[Tensor, Tensor]:
    """A vocabulary block's top-k as (token ids, values), its ids shifted to the whole vocabulary."""
    return top.indices + first, top.values


def _merge(blocks: list[tuple[Tensor, Tensor]], k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """The top-k `[rows, k]` (ids, values) over the blocks' top-k candidates."""
    ids, vals = torch.cat([b[0] for b in blocks], 1), torch.cat([b[1] for b in blocks], 1)
    top = vals.topk(k, dim=1, largest=largest)
    return ids.gather(1, top.indices), top.values


def lens_agreement(model: LanguageModel, token_ids: Tensor) -> Tensor:
    """`[n]`: how much each row of `token_ids [n, k]` (a latent's top logit-lens tokens) is about one
    thing: the mean cosine similarity, over the k(k - 1) ordered pairs, of those tokens' output
    embeddings centred on the vocabulary's mean. The lens of a topic latent says one word in several
    forms or its neighbours (" food", " foods", " meals": 0.50); a direction the output reads as
    noise picks unrelated tokens (" energized", " BLINK", " Wolverine": 0.08). A random direction's
    lens has 0.08 (median) and 0.16 (9 in 10 below) in Gemma 3 270M."""
    k = token_ids.shape[1]
    if k < 2:
        return torch.ones(token_ids.shape[0])
    w = model.hf.get_output_embeddings().weight.detach()  # [vocab, d]
    e = w[token_ids].float() - w.mean(0, dtype=torch.float32)  # [n, k, d]
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return ((e @ e.transpose(1, 2)).sum((1, 2)) - (e * e).sum((1, 2))) / (k * (k - 1))


def word_token_ids(model: LanguageModel, word: str) -> list[int]:
    """The single-token forms of `word` (`' dog'`, `' Dog'`, `'dog'`, `'Dog'`, as given and
    lower-cased), as token ids; empty when each takes several tokens."""
    word = word.strip()
    cases = {word, word.lower(), word.capitalize()}
    forms = {prefix + w for w in cases for prefix in (" ", "")}
    ids: set[int] = set()
    for form in forms:
        got = model.tokenizer(form, add_special_tokens=False)["input_ids"]
        if len(got) == 1:
            ids.add(int(got[0]))
    return sorted(ids)


_UNEMBEDDING_MOMENTS: dict[int, tuple[Tensor, Tensor]] = {}  # id(model) -> (mean, covariance)


def unembedding_moments(model: LanguageModel) -> tuple[Tensor, Tensor]:
    """The mean `[d_model]` and covariance `[d_model, d_model]` of the unembedding's columns (one per
    vocabulary token), computed once per model: a direction's logit lens has mean `d @ mean` and
    variance `d @ cov @ d` over the vocabulary, without the `[d_sae, vocab]` product."""
    key = id(model)
    if key not in _UNEMBEDDING_MOMENTS:
        w_u = unembedding(model).float()  # [d_model, vocab]
        mean = w_u.mean(1)
        cov = (w_u @ w_u.t()) / w_u.shape[1] - torch.outer(mean, mean)
        _UNEMBEDDING_MOMENTS.clear()  # one model at a time
        _UNEMBEDDING_MOMENTS[key] = (mean, cov)
    return _UNEMBEDDING_MOMENTS[key]


@torch.no_grad()
def promoting(
    model: LanguageModel,
    sae: SAE,
    site: Site,
    token_ids: list[int],
    hidden: Tensor | None = None,
    k: int = 20,
) -> list[dict[str, Any]]:
    """The latents whose decoder direction promotes one of `token_ids` most, relative to the rest of
    the vocabulary: each latent's logit lens standardised over the vocabulary (z-score: the token's
    logit less the lens' mean, over its standard deviation; exact, from `unembedding_moments`), its
    best token of the list. A steering handle for a word: turned up, such a latent raises that
    word's logit by more standard deviations than any other latent. `hidden [d_sae]` (bool): latents
    left out (e.g. the dense ones). Returns `[{index, z, token_id}]`, best first."""
    if not token_ids:
        return []
    directions = output_directions(model, sae, site).float()  # [d_sae, d_model], the gain folded in
    mean, cov = unembedding_moments(model)
    w_u = unembedding(model).float()[:, token_ids]  # [d_model, n]
    std = ((directions @ cov) * directions).sum(1).clamp_min(1e-12).sqrt()  # [d_sae]
    z = (directions @ w_u - (directions @ mean)[:, None]) / std[:, None]  # [d_sae, n]
    best, which = z.max(1)
    if hidden is not None:
        best = best.masked_fill(hidden, -torch.inf)
    top = best.topk(min(k, best.shape[0]))
    return [
        {"index": int(i), "z": float(v), "token_id": int(token_ids[int(which[i])])}
        for v, i in zip(top.values, top.indices, strict=True)
        if torch.isfinite(v)
    ]


def decoder_neighbours(sae: SAE, k: int = 10) -> tuple[Tensor, Tensor]:
    """For each latent, the `k` other latents whose decoder rows have the highest cosine similarity
    with its own: indices `[d_sae, k]` and cosines `[d_sae, k]`, computed exactly a chunk of rows at
    a time. A zero decoder row has cosine 0 with everything."""
    w = sae.W_dec.detach()
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d_sae = unit.shape[0]
    k = min(k, d_sae - 1)
    step = max(1, _CHUNK_ENTRIES // d_sae)
    indices, cosines = [], []
    with torch.no_grad():
        for start in range(0, d_sae, step):
            stop = min(d_sae, start + step)
            cos = unit[start:stop] @ unit.t()  # [chunk, d_sae]
            cos[torch.arange(stop - start), torch.arange(start, stop)] = -torch.inf  # not itself
            top = cos.topk(k, dim=1)
            indices.append(top.indices)
            cosines.append(top.values)
    return torch.cat(indices), torch.cat(cosines)
