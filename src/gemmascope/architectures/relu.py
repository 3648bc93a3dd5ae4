"""The ReLU SAE (Bricken et al. 2023) with an L1 penalty: `f = relu(pre_acts)`. Holds the module
(`ReLUSAE`) and the architecture object (`ReLU`: sparsity set by `l0_coeff` as the L1 coefficient;
its biases learn, since b_enc is what makes it sparse; SAELens calls it "standard").

Knows nothing of the training loop or of files: the loop calls `ReLU` through `sae.architecture`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gemmascope.sae import SAE, Architecture, SpecLike, register_architecture


class ReLUSAE(SAE):
    """ReLU SAE (Bricken et al. 2023), trained with an L1 penalty on `f` (`ReLU.penalty`)."""

    def activation(self, pre_acts: Tensor) -> Tensor:
        return torch.nn.functional.relu(pre_acts)


class ReLU(Architecture):
    """ReLU's training and saving: the L1 penalty λ·Σ f (decoder rows are unit norm, so this is
    Anthropic's f·‖W_dec‖ penalty too); under the sign optimiser b_enc and b_dec learn."""

    name = "relu"
    module = ReLUSAE
    knobs = ("l0_coeff",)
    saelens_name = "standard"
    folder_tag = "relu"
    fixed_biases = False

    def check_spec(self, spec: SpecLike) -> None:
        self.check_positive(spec, "l0_coeff (the L1 coefficient)", spec.l0_coeff)

    def penalty(self, f: Tensor, spec: SpecLike) -> Tensor | float:
        return float(spec.l0_coeff or 0.0) * f.sum(-1).mean()


RELU = register_architecture(ReLU())
