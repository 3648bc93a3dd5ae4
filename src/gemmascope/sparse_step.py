"""The fast JumpReLU training step. Owns `jumprelu_terms_sparse`, a drop-in for the plain reference
`architectures.jumprelu.jumprelu_terms` (the same keyword arguments; same values, same gradients
within fp32 rounding) for SAEs and transcoders alike, that does only one dense product: the encoder's. Everything
else touches only the (token, latent) pairs that are active, or near enough to the threshold for its
pseudo-gradient (RECIPE.md section 2). With u = x − (the pre-encoder bias: an SAE's b_dec, a
transcoder's b_in) and r = y − b_dec − skip(x) what the latents must reconstruct (y = x for an SAE,
a transcoder's target; skip its affine skip connection), both left to autograd:

    forward   pre = u @ W_enc + b_enc                  dense, in row blocks, never held whole
              keep (b, i) with pre > θ_i - ε            the active set plus the kernel's support
              r̂ = f @ W_dec                            sparse CSR [B, S] @ dense
    backward  G = ∂recon/∂r̂ = 2 (r̂ - r) / B,  ∂recon/∂r = -G
              ∂f[b, i] = G[b] · W_dec[i] on kept pairs  sampled dense-dense product (SDDMM)
              grad W_dec = fᵀ G, grad W_encᵀ = (∂pre)ᵀ u   sparse CSR [S, B] @ dense
              grad b_enc, grad θ                        index_add over kept pairs
              ∂recon/∂u = (∂pre) @ W_encᵀ               sparse CSR [B, S] @ dense, when asked

The other terms of the loss come from the same pairs: each latent's firing rate on the batch (its L0
share; the target-L0 penalty reads their sum, Gemma Scope 2's dense penalty the rates over its limit)
is its count of active pairs over B, with θ's pseudo-gradient from the near pairs, so neither term
needs a product of its own; the dead latents' pre-activation loss takes their few columns of the
encoder (a [B, n_dead] product) and adds its gradients into the same outputs, so that W_enc gets one
gradient a step, not one per term (each a full-size tensor to fill and add: 15 ms of a ~120 ms CPU
step at width 4,096). The encoder's gradient comes latent by latent, [S, d_in]: W_enc stored as its
transpose (`latent_major_encoder`, which the trainer applies) takes it without a copy.

With Matryoshka prefixes m₁ < … < m_J (Gemma Scope 2; Bussmann et al. 2025) the recon term is the mean
over j of ‖r − r̂ⱼ‖², r̂ⱼ built from the first mⱼ latents only: the kept pairs fall into bands
[mⱼ₋₁, mⱼ), r̂ⱼ adds band j's sparse product to r̂ⱼ₋₁, and a latent of band j reads Hⱼ = Σ_{j'≥j} Gⱼ'
wherever the plain step reads G (one band: the plain step).

The reference does six dense products of 2·B·d_in·d_sae FLOPs (encoder and decoder forward, and two
each backward) and keeps several [B, d_sae] tensors; this does one and keeps none, so its limit is
the dense matmul rate / (2·d_in·d_sae) tokens per second (see benchmarks/train_step.py). With
`dtype` bfloat16 (`TrainConfig.step_dtype`, auto where the device computes it natively) that one
product runs in bfloat16 (7 times float32's rate on a CPU with AMX) and the rest stays float32:
the kept pairs and their values are then the bfloat16 product's (within about 2^-8 of float32's,
near the kernel's width ε = 3e-3 for pre-activations around 0.5: measured harmless with the default
recipe, BENCHMARKS "The step's encoder product in bfloat16"; not measured with a smaller ε or Adam,
where float32 is the safe choice). "Same values, same gradients" above holds in float32.
The same code runs on CPU (MKL sparse kernels) and on CUDA (cuSPARSE through torch.sparse).

Knows nothing of the training loop, the optimiser or files (it only says, `latent_major_encoder`, which
layout of W_enc its gradient takes; the trainer applies it); the JumpReLU architecture
(`architectures/jumprelu.py`) picks this or the reference with `TrainConfig.fast`. Takes any SAE with
a per-latent `threshold` (a JumpReLU SAE or transcoder).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from gemmascope.sae import SAE

# The encoder product is done in row blocks of at most this many [rows, d_sae] elements (1 GiB of
# fp32), so a wide SAE never holds a whole [batch, d_sae] matrix.
BLOCK_ELEMENTS = 2**28


def jumprelu_terms_sparse(
    sae: SAE,
    x: Tensor,
    bandwidth: float,
    prefixes: tuple[int, ...] | None = None,
    target: Tensor | None = None,
    dtype: torch.dtype | None = None,
    dead: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The terms of the JumpReLU loss on `x [batch, d_in]` (already divided by C), computed
    sparsely. Returns `recon` (mean over the batch of ‖y − ŷ‖², y = x for an SAE, a transcoder's
    `target [batch, d_out]`, ŷ with b_dec and any skip connection; with Matryoshka `prefixes`, the
    mean of that over the nested reconstructions from the first m latents, m in `prefixes`), `rate
    [d_sae]` (each latent's firing rate on the batch, the mean of H(preᵢ − θᵢ); L0 is its sum; its
    gradient goes to θ only, through the rectangle-kernel pseudo-derivative), `fired [d_sae]`
    (float32 counts) and `below` (the pre-activation loss of the `dead [n]` latents, indices: the
    batch mean of Σᵢ ReLU(θᵢ − preᵢ) over them; 0 without), exactly as
    `architectures.jumprelu.jumprelu_terms`; backward fills the gradients of every parameter that
    takes one (and of x, if it requires one). `dtype`: the encoder product's arithmetic (`kept_pairs`;
    None: float32, the reference's values)."""
    bounds = tuple(prefixes) if prefixes else (sae.d_sae,)
    if list(bounds) != sorted(set(bounds)) or bounds[0] < 1 or bounds[-1] != sae.d_sae:
        raise ValueError(
            f"Matryoshka prefixes {bounds} must increase strictly from >= 1 to d_sae {sae.d_sae}"
        )
    y = x if target is None else target
    residual = y - sae.b_dec - sae.skip(x)  # [B, d_out]: what the latents must reconstruct
    recon, rate, fired, below = _SparseJumpReLU.apply(
        sae.centered(x),
        residual,
        sae.W_enc,
        sae.b_enc,
        sae.W_dec,
        sae.threshold,
        float(bandwidth),
        bounds,
        dtype,
        dead,
    )
    return recon, rate, fired, below


def kept_pairs(
    x_centered: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    low: Tensor,
    block_elements: int = BLOCK_ELEMENTS,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The (token, latent) pairs whose pre-activation exceeds `low [d_sae]`, in row-major order:
    `rows [nnz]`, `cols [nnz]` (int64) and their pre-activations `pre_acts [nnz]`, equal to
    `x_centered @ W_enc + b_enc` at those pairs. The dense product runs in row blocks of at most
    `block_elements` elements, and the bias is added after the gather (the reference's rounding).

    `dtype` (None: the inputs'): the product's arithmetic. In bfloat16 (`TrainConfig.step_dtype`,
    about 7 times float32's rate on a CPU with AMX) the pairs and values are those of the product
    taken in bfloat16, each compared with `low` as float32 is."""
    batch, d_sae = x_centered.shape[0], W_enc.shape[1]
    low_unbiased = low - b_enc  # compare the bare product with (low - b_enc): no pass adds the bias
    W = W_enc if dtype is None else W_enc.to(dtype)
    # the comparison in the product's own dtype (a mixed one is 4 times slower), against a bound at
    # or below `low_unbiased`; the gathered values are then held to `low_unbiased` itself
    screen = _at_or_below(low_unbiased, W.dtype)
    block = max(1, min(batch, block_elements // d_sae))
    rows, cols, values = [], [], []
    for start in range(0, batch, block):
        product = x_centered[start : start + block].to(W.dtype) @ W  # [block, d_sae]
        flat = torch.nonzero((product > screen).view(-1)).squeeze(1)
        value = product.view(-1)[flat].to(x_centered.dtype)
        col = flat % d_sae
        if screen is not low_unbiased:
            held = value > low_unbiased[col]
            flat, value, col = flat[held], value[held], col[held]
        values.append(value)
        rows.append(torch.div(flat, d_sae, rounding_mode="floor") + start)
        cols.append(col)
    col = torch.cat(cols)
    return torch.cat(rows), col, torch.cat(values) + b_enc[col]


def _at_or_below(bound: Tensor, dtype: torch.dtype) -> Tensor:
    """`bound` itself in its own dtype, else the largest values of `dtype` at or below it."""
    if dtype == bound.dtype:
        return bound
    rounded = bound.to(dtype)
    lower = torch.nextafter(rounded, torch.tensor(-torch.inf, dtype=dtype, device=bound.device))
    return torch.where(rounded.to(bound.dtype) > bound, lower, rounded)


def _bands(cols: Tensor, bounds: tuple[int, ...]) -> Tensor | None:
    """Each kept pair's Matryoshka band `[nnz]` (band j: latents [bounds[j-1], bounds[j])); None for
    one band (no prefixes), where every pair is in it."""
    if len(bounds) == 1:
        return None
    return torch.bucketize(cols, torch.tensor(bounds, device=cols.device), right=True)


def _in_band(band: Tensor | None, j: int) -> Tensor | slice:
    """The kept pairs of band `j`: a mask, or every pair (a slice, no copy) when there is one band."""
    return slice(None) if band is None else band == j


def latent_major_encoder(sae: SAE) -> None:
    """Store `sae.W_enc [d_in, d_sae]` as the transpose of a contiguous `[d_sae, d_in]`, the layout
    in which the sparse step computes its gradient (one latent's row at a time): autograd then keeps
    that gradient as it is instead of copying it into a transposed layout (a 10 MB transposing copy
    every step at width 4,096, 9 ms of a ~120 ms CPU step). Values, products and saved files are the
    same; call before making the optimiser (its state takes the parameter's layout)."""
    with torch.no_grad():
        sae.W_enc = torch.nn.Parameter(sae.W_enc.detach().t().contiguous().t(), sae.W_enc.requires_grad)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # torch warns once that sparse CSR is "beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def csr_rows(
    rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int], index_dtype: torch.dtype = torch.int64
) -> Tensor:
    """A sparse CSR tensor `[shape]` of row-ordered `(rows, cols, values)` (`rows` sorted), its
    indices in `index_dtype` (int32: MKL's and cuSPARSE's fast kernels)."""
    return _csr(_crow(rows, shape[0], index_dtype), cols.to(index_dtype), values, shape)


def _crow(sorted_index: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """CSR row pointers `[n + 1]` of a sorted row-index vector."""
    crow = torch.zeros(n + 1, dtype=dtype, device=sorted_index.device)
    crow[1:] = torch.cumsum(torch.bincount(sorted_index, minlength=n), 0)
    return crow


class _SparseJumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_centered: Tensor,
        residual: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        threshold: Tensor,
        bandwidth: float,
        bounds: tuple[int, ...],
        dtype: torch.dtype | None,
        dead: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, d_sae = x_centered.shape[0], W_enc.shape[1]
        # A margin of a whole bandwidth below θ keeps every pair the kernel K((pre - θ)/ε) can touch,
        # whatever the rounding of (θ - ε - b_enc).
        rows, cols, pre_acts = kept_pairs(x_centered, W_enc, b_enc, threshold - bandwidth, dtype=dtype)
        theta = threshold[cols]
        active = pre_acts > theta
        u = (pre_acts - theta) / bandwidth  # as the reference computes the kernel's argument
        near = (u > -0.5) & (u < 0.5)
        # The few kept pairs that are neither active nor near (θ - ε < pre <= θ - ε/2) carry zeros.

        # int32 indices: MKL's and cuSPARSE's 32-bit kernels are the fast ones
        index_dtype = torch.int32 if max(rows.numel(), batch, d_sae) < 2**31 - 1 else torch.int64
        f_values = pre_acts * active  # [nnz]: f at kept pairs (0 where only near)
        # Matryoshka: band j holds latents [bounds[j-1], bounds[j]); the j-th nested reconstruction
        # sums bands 0..j. Without prefixes there is one band, every latent.
        band = _bands(cols, bounds)
        r_hat = torch.zeros_like(residual)
        errors, recon = [], residual.new_zeros(())
        for j in range(len(bounds)):
            pick = _in_band(band, j)
            crow = _crow(rows[pick], batch, index_dtype)
            r_hat = r_hat + _csr(crow, cols[pick].to(index_dtype), f_values[pick], (batch, d_sae)) @ W_dec
            errors.append(r_hat - residual)  # [B, d_out]
            recon = recon + errors[-1].pow(2).sum(-1).mean()
        recon = recon / len(bounds)
        fired = torch.bincount(cols[active], minlength=d_sae).to(torch.float32)  # [d_sae] counts
        rate = fired.to(residual.dtype) / batch  # [d_sae]; differentiable in θ (backward)
        below, gap = residual.new_zeros(()), None
        if dead is not None and dead.numel():  # the dead latents' own small product [B, n_dead]
            gap = threshold[dead] - (x_centered @ W_enc[:, dead] + b_enc[dead])
            below = torch.relu(gap).sum(-1).mean()

        ctx.mark_non_differentiable(fired)
        ctx.save_for_backward(
            x_centered, torch.stack(errors), W_enc, W_dec, threshold, rows, cols, band, f_values, active, near
        )
        ctx.bandwidth = bandwidth
        ctx.index_dtype = index_dtype
        ctx.dead = (dead, None if gap is None else gap > 0)
        return recon, rate, fired, below

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_recon: Tensor, grad_rate: Tensor, _grad_fired: Any, grad_below: Tensor
    ) -> tuple[Tensor | None, ...]:
        (x_centered, errors, W_enc, W_dec, threshold, rows, cols, band, f_values, active, near) = (
            ctx.saved_tensors
        )
        eps: float = ctx.bandwidth
        index_dtype: torch.dtype = ctx.index_dtype
        batch, d_sae = x_centered.shape[0], W_enc.shape[1]
        n_bands = errors.shape[0]
        need_x, need_residual, need_W_enc, need_b_enc, need_W_dec, need_theta = ctx.needs_input_grad[:6]

        # ∂recon/∂x̂ⱼ for each nested reconstruction j; a latent of band j is in reconstructions
        # j..J-1, so its gradient reads Hⱼ = Σ_{j' >= j} Gⱼ' (one band: H₀ = G)
        G = errors * (2.0 * grad_recon / (batch * n_bands))  # [J, B, d_out]
        H = G if n_bands == 1 else G.flip(0).cumsum(0).flip(0)  # [J, B, d_out]
        grad_f = torch.zeros_like(f_values)  # ∂loss/∂f at the kept pairs: Hⱼ[b] · W_dec[i]
        for j in range(n_bands):
            pick = _in_band(band, j)
            pattern = _csr(
                _crow(rows[pick], batch, index_dtype),
                cols[pick].to(index_dtype),
                f_values[pick],
                (batch, d_sae),
            )
            grad_f[pick] = torch.sparse.sampled_addmm(pattern, H[j], W_dec.t(), beta=0.0).values()
        grad_pre = grad_f * active  # ∂f/∂pre = H(pre - θ); the L0 term sends none

        # ∂f/∂θ = -(θ/ε) K, ∂H/∂θ = -(1/ε) K; a rate is a mean over the batch
        per_pair = (-(threshold[cols] / eps) * grad_f - grad_rate[cols] / (eps * batch)) * near
        grad_theta = torch.zeros_like(threshold).index_add_(0, cols, per_pair)
        grad_b_enc = torch.zeros_like(threshold).index_add_(0, cols, grad_pre)
        grad_W_dec, grad_enc_rows = _weight_grads(
            x_centered, H, rows, cols, band, f_values, grad_pre, d_sae, index_dtype, need_W_dec, need_W_enc
        )
        grad_x = None
        if need_x:  # ∂recon/∂(x - pre-encoder bias) through the encoder
            crow = _crow(rows, batch, index_dtype)
            grad_x = _csr(crow, cols.to(index_dtype), grad_pre, (batch, d_sae)) @ W_enc.t()

        dead, below = ctx.dead
        if below is not None:  # ∂/∂pre of ReLU(θ − pre) for the dead latents: [B, n_dead]
            d_pre = below * (-grad_below / batch)
            per_latent = d_pre.sum(0)
            grad_theta.index_add_(0, dead, -per_latent)
            grad_b_enc.index_add_(0, dead, per_latent)
            if grad_enc_rows is not None:
                grad_enc_rows.index_add_(0, dead, d_pre.t() @ x_centered)
            if grad_x is not None:
                grad_x += d_pre @ W_enc[:, dead].t()
        return (
            grad_x,
            -H[0] if need_residual else None,  # r̂ⱼ − r in every reconstruction: -Σⱼ Gⱼ
            None if grad_enc_rows is None else grad_enc_rows.t(),  # see `latent_major_encoder`
            grad_b_enc if need_b_enc else None,
            grad_W_dec,
            grad_theta if need_theta else None,
            None,
            None,
            None,
            None,
        )


def _weight_grads(
    x_centered: Tensor,
    H: Tensor,
    rows: Tensor,
    cols: Tensor,
    band: Tensor | None,
    f_values: Tensor,
    grad_pre: Tensor,
    d_sae: int,
    index_dtype: torch.dtype,
    need_W_dec: bool,
    need_W_enc: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """The decoder's gradient `[d_sae, d_out]` (a latent of band j reads Hⱼ `[J, B, d_out]`) and
    the encoder's, latent by latent, `[d_sae, d_in]` (W_enc's transposed), from the kept pairs'
    values `f_values` and pre-activation gradients `grad_pre [nnz]`: sparse `[d_sae, B]` products."""
    if not (need_W_dec or need_W_enc):
        return None, None
    batch = x_centered.shape[0]
    # the transposed pattern [d_sae, B]: kept pairs sorted by latent (so band by band)
    order = torch.argsort(cols * batch + rows)  # by latent, then token
    crow_t = _crow(cols[order], d_sae, index_dtype)
    row_t = rows[order].to(index_dtype)
    grad_W_dec = grad_enc_rows = None
    if need_W_dec:
        for j in range(H.shape[0]):  # rows of band j's latents from Hⱼ
            values = f_values[order] if band is None else f_values[order] * (band[order] == j)
            part = _csr(crow_t, row_t, values, (d_sae, batch)) @ H[j]
            grad_W_dec = part if grad_W_dec is None else grad_W_dec + part
    if need_W_enc:
        grad_enc_rows = _csr(crow_t, row_t, grad_pre[order], (d_sae, batch)) @ x_centered
    return grad_W_dec, grad_enc_rows
