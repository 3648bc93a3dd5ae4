"""The decoder refit, the last stage of training: with the encoder fixed, the codes of every training
token are fixed, and the decoder that reconstructs them best is a least-squares problem with a closed
form. Owns `NormalEquations` (their sums, batch by batch), `refit_decoder` (one SAE: one pass over its
training tokens, the normal equations, the solve), `refit_clt` (a cross-layer transcoder's, layer by
layer, with the same two) and `solve_decoder` (the solve alone, a pure function).

A short run leaves the decoder far from that optimum (sign descent moves every weight by lr per step,
and the density penalty keeps moving the codes under it): at resid_post.6 of Gemma 3 270M, 300k
tokens, the refit takes the held-out FVU from 0.102 to 0.082 and ΔLM loss from 0.62 to 0.48 at the
same codes, so the same L0, density and dead latents (BENCHMARKS.md, "Training quality against
sparsify"). SAEs wider than REFIT_MAX_LATENTS are saved as trained (the normal equations take 8
bytes per latent squared, and the solve a copy of them). What is re-solved, on the SAE's
training-space inputs (already / C, massive tokens left out as in training):
- an SAE: `W_dec` (rows of the latents that fired), from `x − b_dec` (b_dec, the data mean, is also
  the pre-encoder bias, so it stays: the codes must not change);
- a transcoder: `W_dec`, `b_dec` and, with the affine skip connection, `W_skip`, from its output;
- a Matryoshka SAE: the same, for its loss (every nested prefix's reconstruction), not the plain one.
A small ridge (REFIT_RIDGE times each column's own sum of squares) pulls every row towards its trained
value, so a latent that fired on a handful of tokens keeps most of what training gave it; a latent
that never fired keeps its row. Rows keep the norm the solve gives them (the codes do not change, so
neither does what a feature's activation means; only its direction and size in the output).

The codes are the encoder's own, with its product taken in `TrainConfig.refit_dtype` (auto:
bfloat16 where the device computes it natively, so within its rounding of inference's codes; at
resid_post.12, 300k tokens, the refit 17.5 s -> 12.2 s and the held-out FVU 0.216438 -> 0.216446).

Knows nothing of the step loop, checkpoints or files (see `loop`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from tqdm import tqdm

from gemmascope.activations import ActivationStore
from gemmascope.clt import CrossLayerTranscoder, clt_sites, stack_sites
from gemmascope.models import reading_dtype
from gemmascope.sae import SAE
from gemmascope.sites import Site
from gemmascope.sparse_step import csr_rows
from gemmascope.train.config import TrainConfig
from gemmascope.train.recipe import matryoshka_prefixes
from gemmascope.train.trainee import Trainee, training_pair

# How much the refit reads and how (`recipe.SHORT_RUN.refit_tokens` says how many tokens, and what it
# gains). The ridge pulls each row towards its trained value by this fraction of the latent's own sum
# of squares (a latent seen on a handful of tokens keeps part of what training gave it; 1e-3 cost
# 0.0003 of FVU, 1e-2 0.018, against none).
REFIT_BATCH = 4096
REFIT_FLUSH = 16  # batches whose codes' Gram is one product (and whose other sums join the float64 ones)
REFIT_CLT_FLUSH = 4  # the same for each layer of a CLT, whose layers all keep their codes at once
# `sparse_codes` encodes this many [tokens, d_sae] pre-activations at a time (8 MB: 512 tokens at
# width 4,096), read for their nonzeros while in cache
REFIT_BLOCK_ELEMENTS = 2**21
REFIT_MAX_LATENTS = 16_384  # wider SAEs are saved as trained (about 4.3 GB at this width)
REFIT_RIDGE = 1e-4


def sparse_codes(sae: SAE, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """`[b, d_sae]` sparse CSR: the codes of `x [b, d_in]` (training space, before centring), encoded
    a block of REFIT_BLOCK_ELEMENTS at a time so each block's pre-activations are read for their
    nonzeros while still in cache (at width 4,096, 110 ms a batch of 4,096 tokens where the whole
    batch at once, made dense, took 204: the refit of 300k tokens 26.3 s -> 19.0 s). With `dtype`
    bfloat16 the encoder's product is taken in it (the bias added in float32): codes within its
    rounding (about 0.4%) of inference's, 3.5 times faster where the CPU has bfloat16 instructions."""
    x, block = sae.centered(x), max(1, REFIT_BLOCK_ELEMENTS // sae.d_sae)
    w_enc = sae.W_enc.to(dtype)
    empty = torch.zeros(0, dtype=torch.long, device=x.device)
    rows, cols, values = [empty], [empty], [torch.zeros(0, device=x.device)]
    for start in range(0, len(x), block):
        part = x[start : start + block]
        pre = sae.pre_acts(part) if dtype == torch.float32 else (part.to(dtype) @ w_enc).float() + sae.b_enc
        r, c, v = sae.active(pre)
        rows.append(r + start)
        cols.append(c)
        values.append(v)
    return csr_rows(torch.cat(rows), torch.cat(cols), torch.cat(values), (len(x), sae.d_sae))


def csr_codes(codes: Tensor) -> Tensor:
    """`[b, d_sae]` sparse CSR of dense `codes [b, d_sae]`."""
    rows, cols = codes.nonzero().unbind(1)
    return csr_rows(rows, cols, codes[rows, cols], (codes.shape[0], codes.shape[1]))


def _add_codes_gram(rows: Tensor, codes: list[Tensor]) -> None:
    """`rows [d_sae, n] += FᵀF` (float64; n >= d_sae: the codes' rows of a Gram matrix whose first
    d_sae columns are the codes', contiguous) for the codes F of several batches (each sparse CSR
    `[b, d_sae]`), stacked. On a CPU: scipy's sparse-times-sparse product (Σ L0² multiply-adds a
    token, not the L0·d_sae of a sparse-times-dense one, which streams a dense row per code through
    memory), the latents split in row chunks over `torch.get_num_threads()` threads (scipy lets go
    of the GIL), each chunk's sparse result added into its own rows: at width 4,096, 16 batches of
    4,096 tokens 3.9 s -> 0.8 s on 2 cores. torch's own sparse-sparse kernel is not used: torch
    2.13's CPU one leaks its result (about 25 MB a batch of 4,096 at width 4,096), which killed the
    18-layer transcoder suite for memory at its seventh layer. Elsewhere (CUDA): Fᵀ sparse times F
    dense, batch by batch."""
    d_sae, n = rows.shape
    if rows.device.type != "cpu":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for f in codes:
                rows[:, :d_sae] += f.t().to_sparse_csr() @ f.to_dense()
        return
    import scipy.sparse  # imported here: only the CPU refit needs it

    crows, offset = [torch.zeros(1, dtype=torch.int64)], 0
    for f in codes:
        crows.append(f.crow_indices()[1:].long() + offset)
        offset += int(f.crow_indices()[-1])
    stacked = scipy.sparse.csr_matrix(
        (
            torch.cat([f.values() for f in codes]).detach().double().numpy(),
            torch.cat([f.col_indices() for f in codes]).numpy(),
            torch.cat(crows).numpy(),
        ),
        shape=(sum(f.shape[0] for f in codes), d_sae),
    )
    by_latent = stacked.T.tocsr()  # [d_sae, tokens]
    # chunks of about equal pairs (a latent's rows cost its tokens), several per thread to even them out
    threads = max(1, torch.get_num_threads())
    share = torch.from_numpy(by_latent.indptr.astype("int64"))
    cuts = torch.searchsorted(share, torch.linspace(0, int(share[-1]), 4 * threads + 1)[1:-1].long())
    bounds = sorted({0, d_sae, *cuts.tolist()})

    def add_chunk(a: int, b: int) -> None:
        part = (by_latent[a:b] @ stacked).tocsr()  # [b - a, d_sae], float64
        rows[a:b].add_(
            torch.sparse_csr_tensor(
                torch.from_numpy(part.indptr.astype("int64")),
                torch.from_numpy(part.indices.astype("int64")),
                torch.from_numpy(part.data),
                (b - a, n),  # the codes' columns are the first d_sae
            )
        )

    with warnings.catch_warnings(), torch.no_grad(), ThreadPoolExecutor(threads) as pool:
        warnings.simplefilter("ignore", UserWarning)
        list(pool.map(add_chunk, bounds[:-1], bounds[1:]))


class NormalEquations:
    """The normal equations ZᵀZ and ZᵀY of a least-squares decoder, summed batch by batch: Z is a
    batch's codes `[b, d_sae]` (sparse) beside `n_extra` dense columns (a transcoder's input for its
    skip, a constant for its output bias), Y what they must give `[b, d_out]`. The codes of
    REFIT_FLUSH batches are kept and their Gram part summed at once in float64 (`_add_codes_gram`);
    the other parts are summed in float32 and join the float64 sums then too (a float64 add per
    batch would cost as much as their products)."""

    def __init__(
        self, d_sae: int, n_extra: int, d_out: int, device: torch.device | str, flush_every: int = REFIT_FLUSH
    ) -> None:
        self.d_sae, size, self.flush_every = d_sae, d_sae + n_extra, flush_every
        self.gram = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.rhs = torch.zeros(size, d_out, dtype=torch.float64, device=device)
        self._codes: list[Tensor] = []  # the codes since the flush, sparse CSR [b, d_sae] each
        self._gram = torch.zeros(n_extra, size, device=device)  # the extras' rows (their columns: symmetric)
        self._rhs = torch.zeros(size, d_out, device=device)
        self._batches = 0
        self.n = 0  # tokens summed

    def add(self, f: Tensor, extra: Tensor | None, y: Tensor) -> None:
        """One batch: the codes `f [b, d_sae]` (sparse CSR: `sparse_codes`, `csr_codes`), `extra [b,
        n_extra]` (None when there are none), `y [b, d_out]`."""
        d_sae = self.d_sae
        self._codes.append(f)
        ft = f.t()  # [d_sae, b]
        self._rhs[:d_sae] += ft @ y
        if extra is not None:
            self._gram[:, :d_sae] += (ft @ extra).t()
            self._gram[:, d_sae:] += extra.t() @ extra
            self._rhs[d_sae:] += extra.t() @ y
        self.n += len(y)
        self._batches += 1
        if self._batches % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        """Sum the kept codes' Gram part, and move the float32 sums into the float64 ones."""
        if self._codes:
            _add_codes_gram(self.gram[: self.d_sae], self._codes)  # the codes' rows: contiguous
        self._codes = []
        self.gram[self.d_sae :] += self._gram.double()
        self.rhs += self._rhs.double()
        for part in (self._gram, self._rhs):
            part.zero_()

    def finish(self) -> tuple[Tensor, Tensor]:
        """`(gram [n, n], rhs [n, d_out])`, float64, everything summed."""
        self.flush()
        self.gram[: self.d_sae, self.d_sae :] = self.gram[self.d_sae :, : self.d_sae].t()
        return self.gram, self.rhs


@torch.no_grad()
def refit_decoder(
    t: Trainee, store: ActivationStore, cfg: TrainConfig, tokens: int, progress: bool = True
) -> int:
    """Re-solve `t.sae`'s decoder (and a transcoder's skip connection and output bias) by least
    squares on its first `tokens` training tokens, in place; the encoder and thresholds are left as
    they are. Returns the number of tokens it was fitted on (0: nothing changed)."""
    sae, device = t.sae, t.sae.W_enc.device
    d_sae, d_in = sae.d_sae, sae.d_in
    if d_sae > REFIT_MAX_LATENTS:  # the normal equations are [d_sae, d_sae] in float64
        return 0
    # the dense columns beside the codes: a transcoder's input (its skip) and a constant (its b_dec)
    n_extra = (d_in if sae.W_skip is not None else 0) + (1 if sae.is_transcoder else 0)
    equations = NormalEquations(d_sae, n_extra, d_in, device)
    dtype = reading_dtype(cfg.refit_dtype, device)
    available = min(int(store.manifest(s)["n_tokens_non_special"]) for s in t.sites)
    batch_size = max(1, min(REFIT_BATCH, tokens, available))  # a small store still gives batches
    batches = store.batches(t.sites, batch_size, seed=cfg.seed, buffer_tokens=cfg.buffer_tokens, scaled=True)
    bar = tqdm(total=tokens, unit="tok", desc=f"refit {t.spec.name}", disable=not progress, leave=False)
    with bar:
        for batch in batches:
            x, target = training_pair(t, batch, device, cfg.max_norm)  # [b, d_in] each
            x, target = x[: tokens - equations.n], None if target is None else target[: tokens - equations.n]
            if len(x):  # not every token of the batch massive
                y = x - sae.b_dec if target is None else target  # what the codes (and extras) must give
                extra = [x] if sae.W_skip is not None else []
                if sae.is_transcoder:
                    extra.append(torch.ones(len(x), 1, device=device))
                equations.add(sparse_codes(sae, x, dtype), torch.cat(extra, 1) if extra else None, y)
                bar.update(len(x))
            if equations.n >= tokens:
                break
    if equations.n == 0:
        return 0
    gram, rhs = equations.finish()
    if t.spec.matryoshka:
        gram, rhs = nested_normal_equations(gram, rhs, matryoshka_prefixes(d_sae))
    old = torch.cat([sae.W_dec, *_extra_rows(sae)]).double()  # [d_sae + n_extra, d_in]
    solved = solve_decoder(gram, rhs, old, REFIT_RIDGE)
    sae.W_dec.copy_(solved[:d_sae])
    if sae.W_skip is not None:
        sae.W_skip.copy_(solved[d_sae : d_sae + d_in])
    if sae.is_transcoder:
        sae.b_dec.copy_(solved[-1])
    return equations.n


def _extra_rows(sae: SAE) -> list[Tensor]:
    rows = [sae.W_skip] if sae.W_skip is not None else []
    return rows + ([sae.b_dec[None]] if sae.is_transcoder else [])


def nested_normal_equations(gram: Tensor, rhs: Tensor, prefixes: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The normal equations of a Matryoshka SAE's loss, Σⱼ ‖Y − Z[:, :mⱼ] W[:mⱼ]‖² over its nested
    prefixes mⱼ, from the plain ones (`gram [n, n]` = ZᵀZ, `rhs [n, d]` = ZᵀY; columns past the
    latents, a transcoder's skip and bias, are in every prefix): a column of band l (latents
    [m_{l-1}, m_l)) is in c(l) = J − l of the J reconstructions, so entry (a, b) of ZᵀZ counts
    c(max(band a, band b)) times and row a of ZᵀY c(band a) times."""
    n, d_sae = gram.shape[0], prefixes[-1]
    band = torch.zeros(n, dtype=torch.long, device=gram.device)  # the extras: band 0, in every prefix
    band[:d_sae] = torch.bucketize(
        torch.arange(d_sae, device=gram.device), torch.tensor(prefixes, device=gram.device), right=True
    )
    count = (len(prefixes) - band).to(gram.dtype)  # [n]
    gram.mul_(torch.minimum(count[:, None], count[None, :]))  # c(max(band a, band b)), in place
    return gram, rhs * count[:, None]


def solve_decoder(gram: Tensor, rhs: Tensor, old: Tensor, ridge: float) -> Tensor:
    """`[n, d]`: the rows W minimising ‖Y − Z W‖² + ridge · Σᵢ Gᵢᵢ ‖Wᵢ − oldᵢ‖², from the normal
    equations' `gram [n, n]` = ZᵀZ and `rhs [n, d]` = ZᵀY; a column that is zero on every token (a
    latent that never fired) keeps its `old [n, d]` row. Solved in float64, returned in float32."""
    diag = gram.diagonal()
    used = (diag > 0).nonzero().squeeze(1)
    out = old.clone()
    if not len(used):
        return out.float()
    g = gram[used[:, None], used[None, :]]  # one copy, solved in place
    weight = ridge * diag[used]
    b = rhs[used] + weight[:, None] * old[used]
    g.diagonal().add_(weight + 1e-9 * float(diag[used].mean()))
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        del g
        out[used] = torch.cholesky_solve(b, factor)
    else:  # not positive definite in floating point (a near-duplicate latent): the general solve
        out[used] = torch.linalg.solve(g, b)
    return out.float()


# ---------------------------------------------------------------------------------------------
# A cross-layer transcoder's refit

# the normal equations (float64, and their float32 sums) of one pass of the CLT refit
REFIT_CLT_BYTES = 5 * 2**30


@torch.no_grad()
def refit_clt(
    clt: CrossLayerTranscoder,
    batches: Callable[[], Iterator[dict[Site, Tensor]]],
    tokens: int,
    progress: bool = True,
) -> int:
    """The decoder refit of a CLT (`train.refit`'s, layer by layer), in place: with every encoder
    fixed, each layer's own decoder rows, its skip and its output bias are re-solved by least squares
    on up to `tokens` tokens of `batches()` (every layer's MLP input and output, in the space `clt`
    reads: raw for a folded CLT), given what the earlier layers' latents write into it (those
    decoders stay as trained: all of a layer's incoming decoders at once would be a system of up to
    n_layers × width unknowns). The normal equations of as many layers as fit in
    REFIT_CLT_BYTES are summed in one pass over the tokens (all 18 at width 4,096; one at a time
    from about 14k latents); wider than REFIT_MAX_LATENTS, nothing is refit. Returns the tokens
    fitted on (0: nothing changed)."""
    n, width = clt.n_layers, clt.width
    n_extra = _refit_extra(clt)
    if width > REFIT_MAX_LATENTS:
        return 0
    # float64 gram and rhs, and the float32 sums between flushes (NormalEquations)
    size, d = width + n_extra, clt.cfg.d_model
    per_layer = 8 * size * (size + d) + 4 * (n_extra * size + size * d)
    group = max(1, REFIT_CLT_BYTES // per_layer)
    seen = 0
    for first in range(0, n, group):
        targets = list(range(first, min(n, first + group)))
        equations, seen = _refit_sums(clt, batches(), tokens, targets, progress)
        if seen == 0:
            return 0
        for t in targets:
            own = clt.decoder(t)[:, 0]  # [width, d]: a view into the stored decoder
            old = [own] + ([clt.W_skip[t]] if clt.W_skip is not None else []) + [clt.b_dec[t][None]]
            gram, rhs = equations.pop(t).finish()  # popped: each layer's float64 sums freed once solved
            solved = solve_decoder(gram, rhs, torch.cat(old).double(), REFIT_RIDGE)
            own.copy_(solved[:width])
            if clt.W_skip is not None:
                clt.W_skip[t].copy_(solved[width:-1])
            clt.b_dec[t].copy_(solved[-1])
    return seen


def _refit_extra(clt: CrossLayerTranscoder) -> int:
    """The refit's unknowns per layer besides the latents' rows: the skip's inputs and the bias."""
    return (clt.cfg.d_model if clt.W_skip is not None else 0) + 1


def _refit_sums(
    clt: CrossLayerTranscoder,
    batches: Iterator[dict[Site, Tensor]],
    tokens: int,
    targets: list[int],
    progress: bool,
) -> tuple[dict[int, NormalEquations], int]:
    """One pass of `refit_clt`: the normal equations of the `targets` layers, and the tokens read."""
    ins, outs = clt_sites(clt)
    n, width, device = clt.n_layers, clt.width, clt.b_dec.device
    equations = {
        t: NormalEquations(width, _refit_extra(clt), clt.cfg.d_model, device, REFIT_CLT_FLUSH)
        for t in targets
    }
    last = targets[-1]
    seen = 0
    bar = tqdm(
        total=tokens,
        unit="tok",
        desc=f"refit CLT layers {targets[0]}-{last}",
        disable=not progress,
        leave=False,
    )
    with bar:
        for batch in batches:
            take = min(tokens - seen, len(batch[ins[0]]))
            xs, ys = (
                stack_sites(batch, ins[: last + 1], str(device))[:, :take],
                stack_sites(batch, outs, str(device))[:, :take],
            )
            own: dict[int, Tensor] = {}
            earlier = {
                t: ys[t].clone() for t in targets
            }  # [b, d]: what t's own latents, skip and bias must give
            for s in range(last + 1):
                acts = clt.encode(s, xs[s])  # [b, width]
                if s in equations:
                    own[s] = acts
                later = [t for t in targets if t > s]
                if later:
                    rows, cols = acts.nonzero().unbind(1)
                    written = (csr_rows(rows, cols, acts[rows, cols], (take, width)) @ clt.W_dec[s]).view(
                        take, n - s, -1
                    )
                    for t in later:
                        earlier[t] -= written[:, t - s]
            ones = torch.ones(take, 1, device=device)
            for t in targets:
                extra = torch.cat([xs[t], ones], 1) if clt.W_skip is not None else ones
                equations[t].add(csr_codes(own[t]), extra, earlier[t])
            seen += take
            bar.update(take)
            if seen >= tokens:
                break
    return equations, seen
