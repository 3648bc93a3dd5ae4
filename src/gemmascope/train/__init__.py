"""Training SAEs with the Gemma Scope recipe (RECIPE.md section 2): the input scaling (activations
divided by the store's C so that E‖x‖² = 1), the pre-encoder bias, the JumpReLU loss with its
straight-through pseudo-derivatives, the initialisation, unit-norm decoder rows in training, the short-run sign
optimiser with schedule-free averaging (or Adam with the lr and sparsity warm-ups, as published), fixed-λ and target-L0 sparsity; training several SAEs (widths, λs, sites) from one
pass over the activation store; checkpoints and bit-exact resume; the training log (plotted by
`evals.report`); folding the input scaling into the saved weights; and torchrun data / SAE parallel
training.

- `recipe`: the published constants beside the measured short-run ones, `TrainSpec`, `TrainConfig`,
  the loss terms, init, schedules, folding, and the run plan.
- `loop`: `train_saes`, several SAEs from one stream.
- `optim`: the sign optimiser with schedule-free averaging, and each SAE's parameter groups.
- `refit`: the decoder refit that ends training (least squares with the codes fixed).
- `trainee`: one SAE in training: its optimiser, running counts, spike guard and held-out measurement.
- `checkpoint`: checkpoints, the run key, the training log.
- `distributed`: torchrun, data-parallel and SAE-parallel.

Knows nothing of the model: it reads activations from `activations.ActivationStore` only.
"""

from gemmascope.evals.report import plot_training_log
from gemmascope.train.checkpoint import read_training_log
from gemmascope.train.distributed import PARALLEL_MODES
from gemmascope.train.loop import train_saes
from gemmascope.train.recipe import (
    ADAM_BETAS,
    ADAM_EPS,
    BANDWIDTH,
    BATCHTOPK_THRESHOLD_MOMENTUM,
    FINAL_FRACTION,
    LR_WARMUP_START,
    MAX_SCALED_NORM,
    PUBLISHED,
    SHORT_RUN,
    TARGET_L0_COEFF,
    THRESHOLD_FLOOR,
    THRESHOLD_INIT,
    TrainConfig,
    TrainSpec,
    fold_scaling,
    init_sae,
    jumprelu_terms,
    lr_at,
    remove_parallel_grad,
    sparsity_coeff_at,
)

__all__ = [
    "ADAM_BETAS",
    "ADAM_EPS",
    "BANDWIDTH",
    "BATCHTOPK_THRESHOLD_MOMENTUM",
    "FINAL_FRACTION",
    "LR_WARMUP_START",
    "MAX_SCALED_NORM",
    "PARALLEL_MODES",
    "PUBLISHED",
    "SHORT_RUN",
    "TARGET_L0_COEFF",
    "THRESHOLD_FLOOR",
    "THRESHOLD_INIT",
    "TrainConfig",
    "TrainSpec",
    "fold_scaling",
    "init_sae",
    "jumprelu_terms",
    "lr_at",
    "plot_training_log",
    "read_training_log",
    "remove_parallel_grad",
    "sparsity_coeff_at",
    "train_saes",
]
