"""The short-run optimiser: sign descent with schedule-free averaging (`ScheduleFreeSign`), and
`make_optimizer`, which builds it or the published Adam for one SAE with the recipe's parameter
groups (which parameters train, at which learning rate, which are kept at unit-norm rows).

Schedule-free averaging (Defazio et al. 2024, "The Road Less Scheduled") keeps two points per
parameter: `z`, which takes the plain steps, and `x`, the running average of the `z`s; the gradient
is taken at `y = (1 - β) z + β x`, the value the parameter holds while training. Each step here:

    z ← z − lr · sign(∂loss/∂y)                   (sign descent: every element moves by lr,
                                                   times its column's `scale` where a group has one)
    x ← x + c (z − x),  c = lr² / Σ lr²          (the average, lr-weighted, as the reference does)
    y ← (1 − β) z + β x

and `averaged()` puts `x` into the parameters for evaluation and saving. The average stands in for a
learning-rate decay, so a run needs no schedule and can stop at any step. Sign descent moves every
parameter by the same amount whatever its gradient's scale, so a rarely firing latent learns as fast
as a common one; eai-sparsify trains its TopK SAEs this way. Rows of a group with `unit_rows` (the
decoder) are put back on the unit sphere after each step, and a group's `floor` (the thresholds') is
kept, in `z`, `x` and `y` alike. A group's `scale` (a tensor broadcast over the last dimension)
sizes each column's step: a CLT's decoders step in each output dimension by that dimension's spread
(`train.clt`), so a dimension where the MLP output barely varies is not written at the others' pace.

Knows nothing of SAEs beyond their parameter names and what their architecture says (its fixed
biases, its own groups: `sae.Architecture`), of the loss or of the loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gemmascope.sae import SAE, architecture


class ScheduleFreeSign(torch.optim.Optimizer):
    """Sign descent with schedule-free averaging. `momentum` is β (the weight of `x` in `y`)."""

    def __init__(self, params: list[dict[str, Any]], lr: float, momentum: float = 0.95) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum {momentum!r} must be in [0, 1)")
        super().__init__(
            params, {"lr": lr, "momentum": momentum, "unit_rows": False, "floor": None, "scale": None}
        )
        self.averaging = False
        self._buffers: dict[torch.device, Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if self.averaging:
            raise RuntimeError("step() while the averaged weights are in place: leave averaged() first")
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            if lr <= 0:
                continue
            group["lr_max"] = max(lr, group.get("lr_max", 0.0))
            group["weight_sum"] = group.get("weight_sum", 0.0) + group["lr_max"] ** 2
            c = group["lr_max"] ** 2 / group["weight_sum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["z"] = p.detach().clone()
                    state["x"] = p.detach().clone()
                z, x = state["z"], state["x"]
                scale = group.get("scale")  # absent from checkpoints written before it existed
                sign = self._scratch(p)  # no new [rows, cols] tensor a step, no change to the gradient
                torch.sign(p.grad, out=sign)
                if scale is not None:
                    sign.mul_(scale.to(p.grad.device))
                z.add_(sign, alpha=-lr)
                x.lerp_(z, c)
                torch.lerp(z, x, beta, out=p)
                for point in (z, x, p):  # the constraints hold at all three points, so in the average too
                    if group["unit_rows"]:
                        _unit_rows(point)
                    if group["floor"] is not None:
                        point.clamp_(min=group["floor"])

    def _scratch(self, p: Tensor) -> Tensor:
        """A buffer shaped and laid out as `p` for its step's sign (an elementwise pass between two
        layouts is a transposing copy): a view of one flat buffer the size of the largest parameter,
        kept between steps (not state: checkpoints do not carry it)."""
        if not _dense(p):
            return torch.empty_like(p)
        flat = self._buffers.get(p.device)
        if flat is None or flat.numel() < p.numel() or flat.dtype != p.dtype:
            flat = self._buffers[p.device] = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
        return flat[: p.numel()].as_strided(p.shape, p.stride())

    @torch.no_grad()
    def swap_in_average(self) -> None:
        """Put each parameter's average `x` in its place (and keep `y` to come back to)."""
        if self.averaging:
            return
        for p, state in self.state.items():
            if "x" in state:
                state["y"] = p.detach().clone()
                p.copy_(state["x"])
        self.averaging = True

    @torch.no_grad()
    def swap_out_average(self) -> None:
        """Back to the training point `y` after `swap_in_average`."""
        if not self.averaging:
            return
        for p, state in self.state.items():
            if "y" in state:
                p.copy_(state.pop("y"))
        self.averaging = False


def _dense(t: Tensor) -> bool:
    """Whether `t` covers exactly `numel` elements of its storage from its offset, in some order of
    its dimensions (contiguous, or a transpose of a contiguous tensor): the layouts a flat buffer can
    take with `as_strided`."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _unit_rows(w: Tensor) -> None:
    w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-12))


class averaged:
    """`with averaged(optimizer):` the parameters hold the values to evaluate and save (for
    ScheduleFreeSign its average; for Adam, the parameters themselves)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def __enter__(self) -> None:
        if isinstance(self.optimizer, ScheduleFreeSign):
            self.optimizer.swap_in_average()

    def __exit__(self, *exc: object) -> None:
        if isinstance(self.optimizer, ScheduleFreeSign):
            self.optimizer.swap_out_average()


def fixed_biases(sae: SAE) -> bool:
    """Whether this SAE's biases stay where initialisation put them (b_enc = 0, b_dec = the data
    mean) under the sign optimiser. Learned at the weights' pace, b_enc turns latents into always-on
    stand-ins for the dominant directions (measured, BENCHMARKS.md); JumpReLU's thresholds and
    TopK's k set sparsity without it. A ReLU SAE needs its b_enc for sparsity, so it learns both
    (`Architecture.fixed_biases`)."""
    return architecture(sae.cfg.architecture).fixed_biases


def make_optimizer(
    sae: SAE, kind: str, lr: float, threshold_lr: float, betas: tuple[float, float], eps: float
) -> torch.optim.Optimizer:
    """The optimiser of one SAE: "signum" (ScheduleFreeSign: W_enc and W_dec at `lr`, biases fixed
    where `fixed_biases` says and a transcoder's skip connection fixed where init fitted it (they stop
    requiring gradients), then the architecture's own groups: the JumpReLU thresholds at
    `threshold_lr`, kept over their floor) or "adam" (every parameter at `lr`, as published)."""
    if kind == "adam":
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=betas, eps=eps)
    groups: list[dict[str, Any]] = [
        {"params": [sae.W_enc], "lr": lr},
        {"params": [sae.W_dec], "lr": lr, "unit_rows": True},
    ]
    if sae.W_skip is not None:  # fitted by ridge regression at init (init.fit_skip), then fixed
        sae.W_skip.requires_grad_(False)
    if fixed_biases(sae):
        for bias in (sae.b_enc, sae.b_dec):
            bias.requires_grad_(False)  # no gradient computed, and none all-reduced across ranks
    else:
        groups.append({"params": [sae.b_enc, sae.b_dec], "lr": lr})
    groups += architecture(sae.cfg.architecture).param_groups(sae, lr, threshold_lr)
    return ScheduleFreeSign(groups, lr=lr)
