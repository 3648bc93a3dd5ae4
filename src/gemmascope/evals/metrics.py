"""The numbers of an SAE evaluation computed from tensors alone: the running sums of the
reconstruction and sparsity metrics (L0, L1, FVU, MSE, cosine, shrinkage, dead/dense, the density
histogram and error by position), of next-token cross-entropy and KL, the CE-recovered and KL scores,
and the health block.

One definition of dead: a latent is dead when it never fired on the N held-out evaluation tokens
(`n_tokens` in the result, printed wherever dead is shown).

Knows nothing of models, forward passes or splicing (core.py), of tables and files (report.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from gemmascope.errors import CorpusError

DENSE_DENSITY = 0.1  # a latent firing on more than 10% of tokens is dense (Gemma Scope 2)
ALWAYS_ON_DENSITY = 0.5  # a latent firing on more than half the tokens stands in for the mean, not a feature
# An SAE looks degenerate (the health warning) when any latent is over ALWAYS_ON_DENSITY, when the
# dense latents carry more than this share of L0, or when more than this fraction of latents is dead.
WARN_DENSE_L0_SHARE = 0.2
WARN_FRAC_DEAD = 0.5
DENSITY_BIN_EDGES = [x / 10 for x in range(-80, 1)]  # log10 density, -8 .. 0 in tenths of a decade


# ---------------------------------------------------------------------------------------------
# Scores defined from the accumulated numbers (kept separate so they can be checked by hand)


def ce_loss_score(ce_clean: float, ce_sae: float, ce_ablation: float) -> float:
    """CE loss recovered: `(CE_ablation - CE_sae) / (CE_ablation - CE_clean)`; 1 is a perfect
    splice, 0 is no better than zero-ablating the site."""
    return (ce_ablation - ce_sae) / (ce_ablation - ce_clean) if ce_ablation != ce_clean else float("nan")


def kl_div_score(kl_sae: float, kl_ablation: float) -> float:
    """SAEBench's KL score: `(KL_ablation - KL_sae) / KL_ablation`; 1 means no change in the
    next-token distributions."""
    return (kl_ablation - kl_sae) / kl_ablation if kl_ablation != 0 else float("nan")


def density_histogram(density: Tensor) -> dict[str, Any]:
    """Histogram of log10 latent density (`density [d_sae]`, the fraction of tokens each latent fires
    on) over `DENSITY_BIN_EDGES`; dead latents (density 0) are counted apart in `n_dead`."""
    alive = density[density > 0].double()
    logd = alive.log10().clamp(DENSITY_BIN_EDGES[0], DENSITY_BIN_EDGES[-1])
    counts = torch.histogram(logd, bins=torch.tensor(DENSITY_BIN_EDGES, dtype=torch.float64)).hist
    return {
        "log10_bin_edges": DENSITY_BIN_EDGES,
        "counts": [int(c) for c in counts.tolist()],
        "n_dead": int((density == 0).sum()),
    }


def health(density: Tensor, n_tokens: int) -> dict[str, Any]:
    """The health block of one SAE from `density [d_sae]`, the fraction of the `n_tokens` held-out
    tokens each latent fired on. Dead means never fired on those tokens. For latents over 50%
    (`ALWAYS_ON_DENSITY`) and over 10% (`DENSE_DENSITY`) density: how many, what fraction of the
    latents, and the share of L0 they carry (the sum of their densities over L0, the sum of all
    densities). `warning` is a plain sentence when the SAE looks degenerate, else None."""
    density = density.double()
    l0 = float(density.sum())
    out: dict[str, Any] = {
        "n_tokens": n_tokens,
        "d_sae": density.numel(),
        "n_dead": int((density == 0).sum()),
        "frac_dead": float((density == 0).double().mean()),
    }
    for name, limit in (("over_50_percent", ALWAYS_ON_DENSITY), ("over_10_percent", DENSE_DENSITY)):
        over = density > limit
        out[f"n_{name}"] = int(over.sum())
        out[f"frac_{name}"] = float(over.double().mean())
        out[f"l0_share_{name}"] = float(density[over].sum()) / l0 if l0 > 0 else 0.0
    out["warning"] = health_warning(out)
    return out


def health_warning(h: Mapping[str, Any]) -> str | None:
    """A plain-language warning for a `health` block that looks degenerate, or None: any latent
    over 50% density, latents over 10% density carrying more than `WARN_DENSE_L0_SHARE` of L0, or
    more than `WARN_FRAC_DEAD` of the latents dead."""
    reasons = []
    if h["n_over_50_percent"] > 0:
        reasons.append(
            f"{h['n_over_50_percent']} latents fire on over half of the held-out tokens (always-on, not features)"
        )
    if h["l0_share_over_10_percent"] > WARN_DENSE_L0_SHARE:
        reasons.append(
            f"the {h['n_over_10_percent']} latents over 10% density carry "
            f"{h['l0_share_over_10_percent']:.0%} of L0"
        )
    if h["frac_dead"] > WARN_FRAC_DEAD:
        reasons.append(f"{h['frac_dead']:.0%} of latents never fired on {h['n_tokens']} held-out tokens")
    return "SAE looks degenerate: " + "; ".join(reasons) if reasons else None


def fvu(target: Tensor, prediction: Tensor) -> Tensor:
    """The fraction of variance unexplained of `prediction [N, d]` against `target [N, d]`:
    `Σ‖target − prediction‖² / Σ‖target − mean(target)‖²` over the N tokens (a 0-dim tensor,
    differentiable: the fine-tune's reconstruction term; `ReconstructionStats` sums the same)."""
    centred = target - target.mean(0)
    return (target - prediction).pow(2).sum() / centred.pow(2).sum().clamp_min(1e-12)


@dataclass
class ReconstructionStats:
    """Running sums for the reconstruction and sparsity metrics of one SAE. Feed it batches of
    activations `x [N, d_in]`, reconstructions `x_hat [N, d_in]`, latents `f [N, d_sae]` and each
    token's position `[N]`; `metrics()` gives L0, FVU and the rest over everything fed."""

    d_sae: int
    context_len: int
    n_tokens: int = 0
    sum_x: Tensor | None = None  # [d_in] float64: for the mean in the FVU denominator
    sum_sq_x: float = 0.0
    sum_err: float = 0.0  # sum of ||x - x_hat||^2
    sum_l0: float = 0.0
    sum_l1: float = 0.0
    sum_cos: float = 0.0
    sum_norm_in: float = 0.0
    sum_norm_out: float = 0.0
    sum_ratio: float = 0.0
    sum_xhat_sq: float = 0.0
    sum_x_dot_xhat: float = 0.0
    fired: Tensor = field(init=False)  # [d_sae] int64: tokens each latent fired on
    err_by_position: Tensor = field(init=False)  # [context_len] float64
    n_by_position: Tensor = field(init=False)  # [context_len] int64

    def __post_init__(self) -> None:
        self.fired = torch.zeros(self.d_sae, dtype=torch.int64)
        self.err_by_position = torch.zeros(self.context_len, dtype=torch.float64)
        self.n_by_position = torch.zeros(self.context_len, dtype=torch.int64)

    def update(self, x: Tensor, x_hat: Tensor, f: Tensor, positions: Tensor) -> None:
        x, x_hat = x.detach().double(), x_hat.detach().double()
        active = f.detach() > 0
        err = (x - x_hat).pow(2).sum(-1)  # [N]
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.n_tokens += x.shape[0]
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_sq_x += float(x.pow(2).sum())
        self.sum_err += float(err.sum())
        self.sum_l0 += float(active.sum())
        self.sum_l1 += float(f.detach().double().abs().sum())
        # a zero vector has no direction: count its cosine as 0, as F.cosine_similarity does
        self.sum_cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum())
        self.sum_norm_in += float(norm_in.sum())
        self.sum_norm_out += float(norm_out.sum())
        self.sum_ratio += float((norm_out / norm_in.clamp_min(1e-12)).sum())
        self.sum_xhat_sq += float(x_hat.pow(2).sum())
        self.sum_x_dot_xhat += float((x * x_hat).sum())
        self.fired += active.sum(0).cpu()
        pos = positions.cpu()
        self.err_by_position.index_add_(0, pos, err.cpu())
        self.n_by_position.index_add_(0, pos, torch.ones_like(pos))

    def total_variance(self) -> float:
        """`sum ||x - mean(x)||^2` over the tokens fed (mean per dimension)."""
        assert self.sum_x is not None
        return self.sum_sq_x - float(self.sum_x.pow(2).sum()) / self.n_tokens

    def metrics(self) -> dict[str, Any]:
        if self.n_tokens == 0:
            raise CorpusError("no non-special tokens were evaluated")
        n = self.n_tokens
        total_var = self.total_variance()
        fvu = self.sum_err / total_var if total_var > 0 else float("nan")
        density = self.fired.double() / n
        per_token_var = total_var / n
        by_pos = [
            None if int(c) == 0 else float(e) / int(c) / per_token_var
            for e, c in zip(self.err_by_position.tolist(), self.n_by_position.tolist(), strict=True)
        ]
        return {
            "l0": self.sum_l0 / n,
            "l1": self.sum_l1 / n,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": self.sum_err / n / (self.sum_x.numel() if self.sum_x is not None else 1),
            "cossim": self.sum_cos / n,
            "l2_norm_in": self.sum_norm_in / n,
            "l2_norm_out": self.sum_norm_out / n,
            "l2_ratio": self.sum_ratio / n,
            "relative_reconstruction_bias": (
                self.sum_xhat_sq / self.sum_x_dot_xhat if self.sum_x_dot_xhat != 0 else float("nan")
            ),
            "frac_alive": float((density > 0).double().mean()),
            "frac_dead": float((density == 0).double().mean()),
            "frac_dense": float((density > DENSE_DENSITY).double().mean()),
            "freq_over_1_percent": float((density > 0.01).double().mean()),
            "freq_over_10_percent": float((density > 0.1).double().mean()),
            "density_histogram": density_histogram(density),
            "health": health(density, n),
            "log10_density": density,
            # mean ||x - x_hat||^2 at each position over the mean total variance per token: its
            # token-weighted mean is the FVU. Position 0 (BOS) is never evaluated.
            "fvu_by_position": by_pos,
        }


class LogitHead(Protocol):
    """What the next-token arithmetic reads of a model's output layer (`models.OutputHead`)."""

    @property
    def vocab(self) -> int: ...

    def logits(self, h: Tensor, start: int = 0, stop: int | None = None) -> Tensor: ...


class CleanDistribution:
    """The clean next-token distributions of a batch, kept to compare edited passes against.

    Built from the clean pass's final hidden states `hidden [N, d]` (what the output layer reads),
    the output layer `head` and the next tokens `targets [N]`. Logits are taken `VOCAB_CHUNK`
    tokens of the vocabulary at a time, so an edited pass holds one `[N, chunk]` block of them (the
    clean pass turns its blocks into the stored probabilities one by one, in place):
    with log p = z - logsumexp(z), KL(clean ‖ edited) = Σ p_clean log p_clean - Σ p_clean z_edited
    + logsumexp(z_edited), so an edited pass costs the output layer's product, one exp pass and one
    dot product with the stored clean probabilities (`probs`, `[N, chunk]` blocks, fp32).
    Differentiable in the edited hidden states when gradients are on."""

    def __init__(self, head: LogitHead, hidden: Tensor, targets: Tensor, chunk: int = 0) -> None:
        self.head, self.targets = head, targets
        chunk = chunk or VOCAB_CHUNK
        self.spans = [(a, min(a + chunk, head.vocab)) for a in range(0, head.vocab, chunk)]
        with torch.no_grad():
            logits = [head.logits(hidden, a, b).float() for a, b in self.spans]  # [N, chunk] each
            lse = torch.stack([z.logsumexp(-1) for z in logits]).logsumexp(0)  # [N]
            self.neg_entropy = torch.zeros_like(lse)  # [N]: Σ p log p
            target_logit = torch.zeros_like(lse)
            for i, ((a, b), z) in enumerate(zip(self.spans, logits, strict=True)):
                target_logit += _target_logit(z, targets, a, b)
                log_p = z.sub_(lse[:, None])  # in place: the block's logits become its log p
                p = log_p.exp()
                self.neg_entropy += _row_dot(p, log_p)
                logits[i] = p  # the block's log p freed: one [N, vocab] array of blocks at most
            self.probs: list[Tensor] = logits
        self.ce = lse - target_logit  # [N]: the clean pass's own cross-entropy

    def unedited(self) -> tuple[Tensor, Tensor]:
        """The clean pass's own cross-entropy `[N]` and KL(clean ‖ clean) (zeros) `[N]`."""
        return self.ce, torch.zeros_like(self.ce)

    def compare(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-entropy `[N]` on the targets of an edited pass whose final hidden states are
        `hidden [N, d]`, and KL(clean ‖ edited) `[N]`."""
        lses, dot, target_logit = [], hidden.new_zeros(()), hidden.new_zeros(())
        for (a, b), p in zip(self.spans, self.probs, strict=True):
            z = self.head.logits(hidden, a, b).float()  # [N, chunk]
            lses.append(z.logsumexp(-1))
            dot = dot + _row_dot(p, z)
            target_logit = target_logit + _target_logit(z, self.targets, a, b)
        lse = torch.stack(lses).logsumexp(0)  # [N]
        return lse - target_logit, self.neg_entropy - (dot - lse)


VOCAB_CHUNK = 8192  # vocabulary tokens per block of logits. Measured on 2 cores (the output layer's
# product and the statistics of [508, chunk] blocks): 1,024 to 8,192 cost the same on a quiet machine;
# on a shared one every elementwise op waits for both threads, and 8,192 makes 8 times fewer of them.


def _target_logit(z: Tensor, targets: Tensor, start: int, stop: int) -> Tensor:
    """`[N]`: the logit of each row's target where it falls in the vocabulary block `start:stop`
    that `z [N, stop - start]` holds, else 0."""
    inside = (targets >= start) & (targets < stop)
    picked = z.gather(1, (targets - start).clamp(0, stop - start - 1)[:, None]).squeeze(1)
    return torch.where(inside, picked, torch.zeros_like(picked))


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """`[N, C], [N, C] -> [N]`: row-wise dot products (on a block in cache, the product and its sum
    beat a batched matmul of N one-row products)."""
    return (a * b).sum(-1)


@dataclass
class NextTokenStats:
    """Running sums of next-token cross-entropy and KL(clean || edited) for one kind of pass."""

    n: int = 0
    sum_ce: float = 0.0
    sum_kl: float = 0.0

    def update(self, ce: Tensor, kl: Tensor) -> None:
        """Add per-prediction cross-entropies `ce [N]` and KL divergences `kl [N]`."""
        self.n += ce.shape[0]
        self.sum_ce += float(ce.double().sum())
        self.sum_kl += float(kl.double().sum())

    @property
    def ce(self) -> float:
        return self.sum_ce / self.n if self.n else float("nan")

    @property
    def kl(self) -> float:
        return self.sum_kl / self.n if self.n else float("nan")
