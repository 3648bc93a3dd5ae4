"""The TopK SAE (Gao et al. 2024): each token keeps its `k` largest pre-activations, ReLU'd. Holds the
module (`TopKSAE`), sparsify's auxiliary loss that brings dead latents back (`auxk_loss`) and the
architecture object (`TopK`: sparsity set by `k` alone, AuxK as its extra term).

Knows nothing of the training loop or of files: the loop calls `TopK` through `sae.architecture`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gemmascope.errors import ConfigError
from gemmascope.sae import SAE, Architecture, SettingsLike, SpecLike, TrainBatch, register_architecture


class TopKSAE(SAE):
    """TopK SAE (Gao et al. 2024): keep the `k` largest pre-activations of each token, ReLU'd."""

    def activation(self, pre_acts: Tensor) -> Tensor:
        k = int(self.cfg.k or 0)
        values, indices = pre_acts.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre_acts).scatter(-1, indices, torch.nn.functional.relu(values))


def auxk_loss(sae: SAE, x: Tensor, residual: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """sparsify's AuxK for TopK SAEs: the `k_aux` most active `dead [d_sae]` latents of each token
    reconstruct the live latents' error `residual [batch, d_in]` (detached), as a fraction of its
    variance, so dead latents learn something useful to come back with."""
    index = dead.nonzero().squeeze(1)
    pre_acts = torch.relu(sae.centered(x) @ sae.W_enc[:, index] + sae.b_enc[index])  # [batch, n_dead]
    values, which = pre_acts.topk(min(k_aux, index.numel()), dim=-1)
    f = torch.zeros_like(pre_acts).scatter(-1, which, values)
    error = residual - f @ sae.W_dec[index]
    return error.pow(2).sum(-1).mean() / (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)


class TopK(Architecture):
    """TopK's training and saving: sparsity set by `k` (no penalty); the run's `auxk_coeff` times
    AuxK on the latents dead for the dead window, with sparsify's k_aux (half of d_in)."""

    name = "topk"
    module: type[SAE] = TopKSAE
    knobs = ("k",)
    saelens_name = "topk"
    folder_tag = "topk"

    def check_spec(self, spec: SpecLike) -> None:
        if not isinstance(spec.k, int) or not 0 < spec.k <= spec.width:
            raise ConfigError(
                f"{spec.architecture} needs a whole k with 0 < k <= width {spec.width}, got {spec.k!r}"
            )
        if spec.l0_coeff is not None or spec.target_l0 is not None:
            raise ConfigError(f"{spec.architecture} sets its sparsity with k only, not l0_coeff or target_l0")

    def aux_loss(self, sae: SAE, batch: TrainBatch, x_hat: Tensor, settings: SettingsLike) -> Tensor | float:
        if not (settings.auxk_coeff and batch.dead.any()):
            return 0.0
        k_aux = max(1, batch.x.shape[1] // 2)  # sparsify's k_aux: half of d_in
        residual = (batch.y - x_hat).detach()
        return settings.auxk_coeff * auxk_loss(sae, batch.x, residual, batch.dead, k_aux)


TOPK = register_architecture(TopK())
