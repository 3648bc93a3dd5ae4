"""Training SAEs with the Gemma Scope recipe (RECIPE.md section 2): the input scaling (activations
divided by the store's C so that E‖x‖² = 1), the pre-encoder bias, the initialisation, unit-norm
decoder rows in training, the short-run sign optimiser with schedule-free averaging (or Adam with the
lr and sparsity warm-ups, as published), fixed-λ and target-L0 sparsity; training several SAEs
(widths, λs, sites, architectures) from one pass over the activation store; checkpoints and bit-exact
resume; the training log (plotted by `evals.report`); the decoder refit; folding the input scaling
into the saved weights; and torchrun data / SAE parallel training. What an architecture adds to a
step (its loss terms, after-step update, groups, saved form) is its own file's, under
`gemmascope.architectures`.

- `recipe`: the published values beside the measured short-run ones (`PUBLISHED`, `SHORT_RUN`, typed
  and frozen), the loop's constants, the warm-ups and the decoder-gradient projection.
- `config`: `TrainSpec`, `TrainConfig` (its fields are the `train` command's flags), their checks and
  `resolve`, the one place a run's open values become numbers (`Plan`).
- `init`: the recipe's initialisation and the start from the first batch.
- `loop`: `train_saes`, several SAEs from one stream.
- `optim`: the sign optimiser with schedule-free averaging, and each SAE's parameter groups.
- `refit`: the decoder refit that ends training (least squares with the codes fixed).
- `save`: the saved form with the scaling folded in, the record in `cfg.extra`, the folder.
- `trainee`: one SAE in training: its optimiser, running counts, spike guard and held-out measurement.
- `checkpoint`: checkpoints, the run key, the training log.
- `distributed`: torchrun, data-parallel and SAE-parallel.
- `finetune`: the end-to-end fine-tune with the model spliced in (training's optimiser and checkpoints).

Knows nothing of the model, but for `finetune` (which trains through it, and which this package does
not re-export): training reads activations from `activations.ActivationStore` only.
"""

from gemmascope.architectures.jumprelu import THRESHOLD_FLOOR, jumprelu_terms
from gemmascope.evals.report import plot_training_log
from gemmascope.train.checkpoint import read_training_log
from gemmascope.train.config import PARALLEL_MODES, Plan, TrainConfig, TrainSpec, resolve
from gemmascope.train.init import init_sae
from gemmascope.train.loop import train_saes
from gemmascope.train.recipe import (
    ADAM_BETAS,
    ADAM_EPS,
    BANDWIDTH,
    FINAL_FRACTION,
    LR_WARMUP_START,
    MAX_SCALED_NORM,
    PUBLISHED,
    SHORT_RUN,
    TARGET_L0_COEFF,
    THRESHOLD_INIT,
    lr_at,
    remove_parallel_grad,
    sparsity_coeff_at,
)
from gemmascope.train.save import fold_scaling

__all__ = [
    "ADAM_BETAS",
    "ADAM_EPS",
    "BANDWIDTH",
    "FINAL_FRACTION",
    "LR_WARMUP_START",
    "MAX_SCALED_NORM",
    "PARALLEL_MODES",
    "PUBLISHED",
    "SHORT_RUN",
    "TARGET_L0_COEFF",
    "THRESHOLD_FLOOR",
    "THRESHOLD_INIT",
    "Plan",
    "TrainConfig",
    "TrainSpec",
    "fold_scaling",
    "init_sae",
    "jumprelu_terms",
    "lr_at",
    "plot_training_log",
    "read_training_log",
    "remove_parallel_grad",
    "resolve",
    "sparsity_coeff_at",
    "train_saes",
]
