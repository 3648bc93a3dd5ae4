"""The BatchTopK SAE (Bussmann et al. 2024): in training the batch keeps its `k * batch` largest
ReLU'd pre-activations, so each token has `k` active latents on average; at inference it is a JumpReLU
SAE with one global threshold, which training estimates as the running mean of the smallest kept
value, and it is saved as that JumpReLU SAE. Holds the module (`BatchTopKSAE`) and the architecture
object (`BatchTopK`: TopK's knob and AuxK, the batch-wide activation, the threshold update after each
step, the JumpReLU saved form).

Knows nothing of the training loop or of files: the loop calls `BatchTopK` through `sae.architecture`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gemmascope.architectures.jumprelu import JUMPRELU, JumpReLUSAE
from gemmascope.architectures.topk import TopK
from gemmascope.sae import SAE, SAEConfig, Terms, register_architecture

THRESHOLD_MOMENTUM = 0.99  # running mean of the smallest kept activation (Bussmann et al.)


class BatchTopKSAE(SAE):
    """BatchTopK SAE (Bussmann et al. 2024). In training, `batch_activation` keeps the `k * batch`
    largest ReLU'd pre-activations of the whole batch; at inference it is a JumpReLU SAE with one
    global `threshold` (a 0-dim buffer the trainer estimates), and it is saved as one
    (`to_jumprelu`)."""

    threshold: Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))

    def batch_activation(self, pre_acts: Tensor) -> Tensor:
        """`[batch, d_sae] -> [batch, d_sae]`: the training-time activation, `k` per token on average."""
        relu = torch.nn.functional.relu(pre_acts)
        flat = relu.flatten()
        n_keep = min(int(self.cfg.k or 0) * pre_acts.shape[0], flat.numel())
        values, indices = flat.topk(n_keep, sorted=False)
        return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre_acts)

    def activation(self, pre_acts: Tensor) -> Tensor:
        mask = pre_acts > self.threshold
        return mask * torch.nn.functional.relu(pre_acts)

    def to_jumprelu(self) -> JumpReLUSAE:
        """The inference-time JumpReLU SAE: same weights, `threshold` filled with the global value."""
        extra = {**self.cfg.extra, "trained_as": BATCHTOPK.name, "k": self.cfg.k}
        cfg = SAEConfig(**{**self.cfg.to_dict(), "architecture": JUMPRELU.name, "k": None, "extra": extra})
        sae = JumpReLUSAE(cfg)
        with torch.no_grad():
            for name, value in self.state_dict().items():
                if name != "threshold":  # a 0-dim global value here, one per latent there
                    getattr(sae, name).copy_(value)
            sae.threshold.fill_(float(self.threshold))
        return sae


class BatchTopK(TopK):
    """BatchTopK's training and saving: TopK's `k` and AuxK with the batch-wide activation; after
    each step the global threshold moves towards the smallest value the batch kept; it ranks the
    whole batch, so its steps cannot be split over data-parallel ranks; saved as JumpReLU."""

    name = "batchtopk"
    module = BatchTopKSAE
    saelens_name = "batchtopk"
    saved_as = JUMPRELU.name
    folder_tag = "batchtopk"
    input_scaled = ("threshold",)
    data_parallel = False

    def train_activation(self, sae: SAE, pre_acts: Tensor) -> Tensor:
        assert isinstance(sae, BatchTopKSAE)
        return sae.batch_activation(pre_acts)

    def after_step(self, sae: SAE, terms: Terms) -> None:
        """The global inference threshold: the running mean of the smallest value the step kept."""
        assert isinstance(sae, BatchTopKSAE) and terms.acts is not None
        with torch.no_grad():
            f = terms.acts
            kept = f[f > 0]
            if kept.numel():
                smallest = kept.min()
                m = THRESHOLD_MOMENTUM if sae.threshold > 0 else 0.0
                sae.threshold.copy_(m * sae.threshold + (1 - m) * smallest)

    def as_saved(self, sae: SAE) -> SAE:
        assert isinstance(sae, BatchTopKSAE)
        return sae.to_jumprelu()


BATCHTOPK = register_architecture(BatchTopK())
