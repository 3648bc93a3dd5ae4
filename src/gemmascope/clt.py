"""The cross-layer transcoder (CLT; Anthropic's circuit-tracing work, Gemma Scope 2's `clt/`): one
JumpReLU encoder per layer reading that layer's MLP input, and per latent one decoder to its own
layer's MLP output and to every later layer's, so a feature the model computes once and uses in
many layers is one latent. Owns the module (`CrossLayerTranscoder`, `CLTConfig`), the replacement
of the model's MLP outputs by it in one forward pass (`splice_clt`), folding training's input and
output scales into its weights (`fold_scales`), and its training terms
(`clt_terms`: the reconstruction of every layer's MLP output, each layer's L0, with the sparse
decoder that touches only active latents times the layers they write).

The layer-l prediction is, with a_s the latents of layer s (`encode(s, x_s)`):

    ŷ_l = Σ_{s ≤ l} a_s W_dec[s][:, l − s] + b_dec[l]  (+ x_l W_skip[l] with the affine skip)

Weights are laid out as circuit-tracer's `CrossLayerTranscoder` holds them (W_dec[s] is
`[width, n_layers − s, d_model]`), except that W_enc[s] is `[d_model, width]` as our SAEs' is.
Knows nothing of files (see `formats.clt`) or of the training loop (see `train.clt`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gemmascope.architectures.jumprelu import JumpReLUSAE, jumprelu, step
from gemmascope.errors import ConfigError, SiteError
from gemmascope.models import LanguageModel
from gemmascope.sae import SAEConfig
from gemmascope.sites import Site, edit_site, site_d_in
from gemmascope.sparse_step import csr_rows, kept_pairs


@dataclass
class CLTConfig:
    """What a CLT is: `n_layers` layers of `width` latents each over a `d_model`-wide model, reading
    `mlp_in.L` and writing `mlp_out.L'` for L' >= L; `affine_skip` adds a per-layer x_L W_skip[L]."""

    n_layers: int
    d_model: int
    width: int
    model_name: str = ""
    affine_skip: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # training details worth keeping

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"a CLT's {name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CrossLayerTranscoder(nn.Module):
    """A JumpReLU CLT. Per layer s: `W_enc[s] [d_model, width]`, `b_enc[s] [width]`, `threshold[s]
    [width]`, `W_dec[s] [width, n_layers − s, d_model]`; `b_dec [n_layers, d_model]`; with the skip,
    `W_skip [n_layers, d_model, d_model]`. `b_in [n_layers, d_model]` is training's pre-encoder bias
    (the inputs' mean), folded into b_enc when saved (then 0): a saved CLT takes raw activations."""

    W_skip: nn.Parameter | None
    b_in: Tensor

    def __init__(self, cfg: CLTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, d, w = cfg.n_layers, cfg.d_model, cfg.width
        self.W_enc = nn.ParameterList([nn.Parameter(torch.zeros(d, w)) for _ in range(n)])
        self.b_enc = nn.ParameterList([nn.Parameter(torch.zeros(w)) for _ in range(n)])
        self.threshold = nn.ParameterList([nn.Parameter(torch.zeros(w)) for _ in range(n)])
        # stored flat, [width, (n_layers − s)·d_model]: a latent's decoders over every layer it writes
        # are one row (the sign optimiser keeps rows at unit norm), viewed 3-D by `decoder`
        self.W_dec = nn.ParameterList([nn.Parameter(torch.zeros(w, (n - s) * d)) for s in range(n)])
        self.b_dec = nn.Parameter(torch.zeros(n, d))
        self.W_skip = nn.Parameter(torch.zeros(n, d, d)) if cfg.affine_skip else None
        self.register_buffer("b_in", torch.zeros(n, d))

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def width(self) -> int:
        return self.cfg.width

    def decoder(self, source: int) -> Tensor:
        """`[width, n_layers − source, d_model]`: the decoders of layer `source`'s latents."""
        return self.W_dec[source].view(self.width, self.n_layers - source, self.cfg.d_model)

    def pre_acts(self, layer: int, x: Tensor) -> Tensor:
        """`[..., d_model] -> [..., width]`: layer `layer`'s encoder before the activation."""
        return (x - self.b_in[layer]) @ self.W_enc[layer] + self.b_enc[layer]

    def encode(self, layer: int, x: Tensor) -> Tensor:
        """`[..., d_model] -> [..., width]`: the latents of layer `layer` from its MLP input."""
        pre = self.pre_acts(layer, x)
        return pre * (pre > self.threshold[layer])

    def skip(self, layer: int, x: Tensor) -> Tensor | float:
        """`[..., d_model]`: the affine skip connection's part of layer `layer`'s output, or 0."""
        return 0.0 if self.W_skip is None else x @ self.W_skip[layer]

    def decode(self, layer: int, acts: list[Tensor]) -> Tensor:
        """`[..., d_model]`: layer `layer`'s MLP output from the latents `acts[s] [..., width]` of
        layers s = 0..layer (the skip connection not included)."""
        out = self.b_dec[layer]
        for s in range(layer + 1):
            out = out + acts[s] @ self.decoder(s)[:, layer - s]
        return out

    def forward(self, xs: Tensor) -> Tensor:
        """`[n_layers, ..., d_model] -> [n_layers, ..., d_model]`: every layer's predicted MLP output
        from every layer's MLP input (dense: for checks and small inputs)."""
        acts = [self.encode(s, xs[s]) for s in range(self.n_layers)]
        return torch.stack([self.decode(t, acts) + self.skip(t, xs[t]) for t in range(self.n_layers)])


def clt_sites(clt: CrossLayerTranscoder) -> tuple[list[Site], list[Site]]:
    """The sites a CLT reads (`mlp_in.L`) and writes (`mlp_out.L`), layer by layer."""
    layers = range(clt.n_layers)
    return [Site("mlp_in", layer) for layer in layers], [Site("mlp_out", layer) for layer in layers]


class CLTLayerSAE(JumpReLUSAE):
    """One layer of a CLT as a dictionary of its own (`layer_sae`): `parts [width, n_layers − L,
    d_model]` are its decoders into layer L's MLP output and every later one's (the CLT's own
    tensor, not copied), which steering and ablation write each at its layer (`writes`)."""

    parts: Tensor

    def writes(self) -> list[tuple[str, Tensor]]:
        layer = int(self.cfg.extra["clt_layer"])
        return [(str(Site("mlp_out", layer + t)), self.parts[:, t]) for t in range(self.parts.shape[1])]


def _layer_heldout(heldout: Any, layer: int) -> dict[str, float]:
    """Layer `layer`'s held-out figures of a trained CLT (`train_clt`'s per-layer lists `fvu`, `l0`,
    `dead` over `tokens`), {} when it has none."""
    if not isinstance(heldout, dict):
        return {}
    out = {
        name: float(heldout[name][layer])
        for name in ("fvu", "l0", "dead")
        if len(heldout.get(name) or []) > layer
    }
    return {**out, "tokens": float(heldout.get("tokens") or 0)} if out else {}


@torch.no_grad()
def layer_sae(clt: CrossLayerTranscoder, layer: int) -> CLTLayerSAE:
    """Layer `layer`'s latents as one JumpReLU transcoder `mlp_in.L -> mlp_out.L`, for what reads one
    dictionary at one site (the feature index and its pages, the microscope, steering). Its encoder
    is the CLT's (the same activations, `b_in` folded); its `W_dec` row is all that the latent writes
    into the residual stream, its decoders over every layer it reaches summed (what the logit lens
    reads); steering and ablation write each part at its own layer (`CLTLayerSAE.writes`). Not a
    reconstruction of layer L's MLP output alone."""
    d, w = clt.cfg.d_model, clt.width
    cfg = SAEConfig(
        architecture="jumprelu", d_in=d, d_sae=w, model_name=clt.cfg.model_name,
        site=str(Site("mlp_in", layer)), hook_name=Site("mlp_in", layer).hook_name,
        out_site=str(Site("mlp_out", layer)),
        extra={"clt": clt.cfg.extra.get("folder", ""), "clt_layer": layer, "decoder": "summed over the layers it writes",
               "heldout": _layer_heldout(clt.cfg.extra.get("heldout"), layer)},
    )  # fmt: skip
    sae = CLTLayerSAE(cfg)
    sae.register_buffer("parts", clt.decoder(layer).detach().float(), persistent=False)
    W_enc = clt.W_enc[layer].detach().float()
    sae.W_enc.copy_(W_enc)
    sae.b_enc.copy_(clt.b_enc[layer].float() - clt.b_in[layer].float() @ W_enc)
    sae.threshold.copy_(clt.threshold[layer].float())
    sae.W_dec.copy_(sae.parts.sum(1))
    sae.b_dec.copy_(clt.b_dec[layer].float())
    return sae.eval()


def stack_sites(batch: dict[Site, Tensor], sites: list[Site], device: str) -> Tensor:
    """`[n_layers, B, d_model]`: a batch's activations at `sites`, layer by layer."""
    return torch.stack([batch[s] for s in sites]).to(device)


def check_model(model: LanguageModel, clt: CrossLayerTranscoder) -> None:
    """A SiteError unless the CLT spans every layer of `model` and its sites are `d_model` wide."""
    if clt.n_layers != model.n_layers:
        raise SiteError(
            f"the CLT spans {clt.n_layers} layers but model {model.name!r} has {model.n_layers}: "
            "expected a CLT trained on this model"
        )
    width = site_d_in(model, Site("mlp_in", 0))
    if width != clt.cfg.d_model:
        raise SiteError(
            f"the CLT reads {clt.cfg.d_model}-wide MLP inputs but model {model.name!r}'s are {width} wide"
        )


@contextmanager
def splice_clt(model: LanguageModel, clt: CrossLayerTranscoder, keep: Tensor) -> Iterator[None]:
    """Within the block, every layer's MLP output is the CLT's prediction at the `keep [B, T]`
    positions (the replacement model of attribution graphs: every MLP replaced, attention and norms
    as they are), in one forward pass: layer L's latents are encoded from its MLP input as the
    edited pass computes it and decoded into layer L and every later layer. Elsewhere the model's
    own activation stays."""
    check_model(model, clt)
    ins, outs = clt_sites(clt)
    acts: dict[int, Tensor] = {}  # this pass's latents by layer (a later pass overwrites them)
    held: dict[int, Tensor] = {}

    def read(layer: int) -> Any:
        def hold(act: Tensor) -> None:
            held[layer] = act
            acts[layer] = clt.encode(layer, act.to(clt.b_dec.dtype))

        return hold

    def write(layer: int) -> Any:
        def replace(act: Tensor) -> Tensor:
            out = clt.decode(layer, [acts[s] for s in range(layer + 1)]) + clt.skip(
                layer, held[layer].to(clt.b_dec.dtype)
            )
            return torch.where(keep[..., None], out.to(act.dtype), act)

        return replace

    with ExitStack() as stack:
        for layer in range(clt.n_layers):
            stack.enter_context(edit_site(model, ins[layer], read(layer)))
            stack.enter_context(edit_site(model, outs[layer], write(layer)))
        yield


@contextmanager
def clamp_clt(
    model: LanguageModel, clt: CrossLayerTranscoder, nodes: Sequence[tuple[int, int, int]], value: float
) -> Iterator[None]:
    """Within the block, each latent of `nodes` (layer, position, latent) is set to `value` at its
    position, the model otherwise free: its activation is read from its layer's MLP input as the
    pass computes it, and (value − activation) times its decoders is added to the MLP output of its
    own layer and of every later layer it writes (the error term kept, as `steer`'s clamp does)."""
    check_model(model, clt)
    ins, outs = clt_sites(clt)
    pending: dict[int, list[tuple[int, Tensor]]] = {t: [] for t in range(clt.n_layers)}

    def read(layer: int) -> Any:
        def hold(act: Tensor) -> None:
            for s, pos, latent in nodes:
                if s != layer or pos >= act.shape[1]:
                    continue
                x = act[:, pos].to(clt.b_dec.dtype)  # [B, d]
                pre = (x - clt.b_in[s]) @ clt.W_enc[s][:, latent] + clt.b_enc[s][latent]  # [B]
                delta = value - pre * (pre > clt.threshold[s][latent])
                for t in range(s, clt.n_layers):
                    pending[t].append((pos, delta[:, None] * clt.decoder(s)[latent, t - s]))

        return hold

    def write(layer: int) -> Any:
        def add(act: Tensor) -> Tensor:
            if not pending[layer]:
                return act
            act = act.clone()
            for pos, vector in pending[layer]:
                act[:, pos] += vector.to(act.dtype)
            pending[layer].clear()
            return act

        return add

    with torch.no_grad(), ExitStack() as stack:
        for layer in range(clt.n_layers):
            stack.enter_context(edit_site(model, ins[layer], read(layer)))
            stack.enter_context(edit_site(model, outs[layer], write(layer)))
        yield


def fold_scales(
    clt: CrossLayerTranscoder, in_scales: list[float], out_scales: list[float]
) -> CrossLayerTranscoder:
    """Fold the scales in, in place (no second copy of a CLT that may be gigabytes), and return it:
    trained on `x_L / C_L` → `y_L / C'_L` with the pre-encoder bias b_in, it becomes the CLT for raw
    activations with b_enc' = C_s (b_enc − b_in W_enc), θ' = C_s θ, W_dec'[s → t] = W_dec[s → t] C'_t
    / C_s, b_dec' = C' b_dec, W_skip'[t] = W_skip[t] C'_t / C_t, b_in' = 0: on raw inputs its latents
    are the training-time ones times C_s and it predicts raw outputs."""
    n = clt.n_layers
    with torch.no_grad():
        for s in range(n):
            c = in_scales[s]
            clt.b_enc[s].copy_(c * (clt.b_enc[s] - clt.b_in[s] @ clt.W_enc[s]))
            clt.threshold[s].mul_(c)
            ratios = torch.tensor([out_scales[t] / c for t in range(s, n)], device=clt.b_dec.device)
            clt.decoder(s).mul_(ratios[None, :, None])
            clt.b_dec[s].mul_(out_scales[s])
            if clt.W_skip is not None:
                clt.W_skip[s].mul_(out_scales[s] / c)
        clt.b_in.zero_()
    return clt


# ---------------------------------------------------------------------------------------------
# Training terms


@dataclass
class CLTTerms:
    """A CLT's loss terms on one batch: `recon` the sum over layers of the batch mean of
    ‖y_L − ŷ_L‖², `l0 [n_layers]` each layer's mean active latents per token (gradient to the
    thresholds through the straight-through step), `fired [n_layers, width]` float32 counts,
    `errors [n_layers]` each layer's part of `recon` (detached), and `tanh [n_layers]` each layer's
    batch mean of Σᵢ tanh(cₗ·aᵢ) (Anthropic's CLT penalty; the decoder rows are unit norm, so
    ‖W_dec,ᵢ‖ = 1), zeros unless asked for."""

    recon: Tensor
    l0: Tensor
    fired: Tensor
    errors: Tensor
    tanh: Tensor


def clt_terms(
    clt: CrossLayerTranscoder,
    xs: Tensor,
    ys: Tensor,
    bandwidth: float,
    tanh_c: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> CLTTerms:
    """The terms of `xs [n_layers, B, d_model]` (every layer's MLP input) and `ys [n_layers, B,
    d_model]` (its MLP output), both as training scales them. Per source layer only the (token,
    latent) pairs over θ − ε are kept (`sparse_step.kept_pairs`); their JumpReLU values (θ's
    pseudo-gradient by the rectangle kernel, as the SAEs') are decoded into every later layer by one
    sparse product (`_SparseDecode`), so the decoder's cost is the active latents times the layers
    they write, not the width times them. `tanh_c [n_layers]`: the tanh penalty's scale per layer;
    `dtype`: the encoder products' arithmetic (`kept_pairs`; None: float32)."""
    n, batch = clt.n_layers, xs.shape[1]
    residual = ys - clt.b_dec[:, None]  # [n, B, d]: what the latents (and the skip) must give
    if clt.W_skip is not None:
        residual = residual - torch.bmm(xs, clt.W_skip)
    predicted: list[Tensor | float] = [0.0] * n
    l0s, fired, tanhs = [], [], []
    for s in range(n):
        x_centered = xs[s] - clt.b_in[s]
        with torch.no_grad():
            low = clt.threshold[s] - bandwidth
            rows, cols, pre = kept_pairs(x_centered, clt.W_enc[s], clt.b_enc[s], low, dtype=dtype)
        pre = _EncoderAtPairs.apply(pre, clt.W_enc[s], clt.b_enc[s], x_centered, rows, cols)  # [nnz]
        theta = clt.threshold[s][cols]
        values = jumprelu(pre, theta, bandwidth)
        l0s.append(step(pre, theta, bandwidth).sum() / batch)
        if tanh_c is not None:
            tanhs.append(torch.tanh(tanh_c[s] * values).sum() / batch)
        fired.append(torch.bincount(cols[pre > theta], minlength=clt.width).to(torch.float32))
        out = _SparseDecode.apply(values, rows, cols, clt.W_dec[s], batch)  # [B, (n − s)·d]
        # unbind, not a slice per layer: each slice's backward would zero a whole [B, n − s, d]
        # (n² of them a step, most of a step's time); unbind's is one stack
        for t, part in enumerate(out.view(batch, n - s, -1).unbind(1), start=s):
            predicted[t] = predicted[t] + part
    errors = torch.stack(
        [(target - predicted[t]).pow(2).sum(-1).mean() for t, target in enumerate(residual.unbind(0))]
    )
    tanh = torch.stack(tanhs) if tanhs else torch.zeros(n, device=xs.device)
    return CLTTerms(errors.sum(), torch.stack(l0s), torch.stack(fired), errors.detach(), tanh)


class _EncoderAtPairs(torch.autograd.Function):
    """The pre-activations `x_centered [B, d] @ W_enc [d, width] + b_enc` at the kept pairs, `pre
    [nnz]` (given: `kept_pairs` computed them), with the gradients of W_enc by the transposed
    pattern, `(Pᵀ x)ᵀ` (P the `[B, width]` sparse matrix of the pairs' gradients), and of b_enc."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, pre: Tensor, W_enc: Tensor, b_enc: Tensor, x_centered: Tensor, rows: Tensor, cols: Tensor
    ) -> Tensor:
        ctx.save_for_backward(x_centered, rows, cols)
        ctx.width = W_enc.shape[1]
        return pre.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_centered, rows, cols = ctx.saved_tensors
        batch = x_centered.shape[0]
        grad_W = grad_b = None
        if ctx.needs_input_grad[1]:
            order = torch.argsort(cols * batch + rows)  # by latent, then token
            pattern_t = csr_rows(cols[order], rows[order], grad[order], (ctx.width, batch))
            grad_W = (pattern_t @ x_centered).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(ctx.width, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        return None, grad_W, grad_b, None, None, None


class _SparseDecode(torch.autograd.Function):
    """`values [nnz]` at row-ordered `(rows, cols)` of a `[B, width]` code matrix, times `W [width,
    D]`: `[B, D]`. Backward: the values' gradient on the pattern only (a sampled dense-dense
    product) and W's by the transposed pattern; never a dense `[B, width]` matrix."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, values: Tensor, rows: Tensor, cols: Tensor, W: Tensor, batch: int
    ) -> Tensor:
        index_dtype = torch.int32 if max(rows.numel(), batch, W.shape[0]) < 2**31 - 1 else torch.int64
        ctx.save_for_backward(values, rows, cols, W)
        ctx.shape = (batch, W.shape[0])
        ctx.index_dtype = index_dtype
        return csr_rows(rows, cols, values, ctx.shape, index_dtype) @ W

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, Tensor | None, None]:  # type: ignore[override]
        values, rows, cols, W = ctx.saved_tensors
        batch, width = ctx.shape
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            pattern = csr_rows(rows, cols, values, ctx.shape, ctx.index_dtype)
            grad_values = torch.sparse.sampled_addmm(pattern, grad, W.t(), beta=0.0).values()
        if ctx.needs_input_grad[3]:
            order = torch.argsort(cols * batch + rows)  # by latent, then token
            grad_W = csr_rows(cols[order], rows[order], values[order], (width, batch), ctx.index_dtype) @ grad
        return grad_values, None, None, grad_W, None
