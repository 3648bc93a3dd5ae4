"""Evaluations of SAEs (RECIPE.md section 4): `core` (the one way to measure the model under an
edit, `edited_batches`, the one `splice`, the core evaluation), `replacement` (the replacement
model's loss: every MLP replaced by per-layer transcoders or a cross-layer transcoder),
`metrics` (the arithmetic of L0, FVU, CE, KL, dead/dense and the health block, from tensors alone),
`probing` (SAEBench-style sparse probing) and `report` (every table and plot of the project, and the `eval.json` / `report/evals.json` files).

This package re-exports the public names so `from gemmascope.evals import evaluate` and
`evals.format_table(...)` work. It knows nothing of the server or of training.
"""

from gemmascope.evals.core import (
    MIN_EVAL_TOKENS,
    EditBatch,
    SAEs,
    edited_batches,
    eval_token_ids,
    evaluate,
    evaluate_tokens,
    replaced_at,
    splice,
    written_site,
    zero_ablate,
)
from gemmascope.evals.metrics import (
    ALWAYS_ON_DENSITY,
    DENSE_DENSITY,
    DENSITY_BIN_EDGES,
    CleanDistribution,
    NextTokenStats,
    ReconstructionStats,
    ce_loss_score,
    density_histogram,
    fvu,
    health,
    health_warning,
    kl_div_score,
)
from gemmascope.evals.probing import (
    PROBE_KS,
    LogisticProbe,
    attach_probing,
    pooled_activations,
    probe_accuracies,
    sparse_probing,
    top_k_by_mean_difference,
)
from gemmascope.evals.replacement import evaluate_replacement
from gemmascope.evals.report import (
    format_table,
    plot_density,
    plot_frontier,
    plot_heatmap,
    plot_position_error,
    plot_training_log,
    probing_table,
    summary,
    to_json,
    write_eval,
    write_report,
)
from gemmascope.sae import norm_limit, sae_site  # the site check and the massive-token limit evals use

__all__ = [
    "evaluate_replacement",
    "written_site",
    "EditBatch",
    "edited_batches",
    "fvu",
    "ALWAYS_ON_DENSITY",
    "DENSE_DENSITY",
    "DENSITY_BIN_EDGES",
    "MIN_EVAL_TOKENS",
    "PROBE_KS",
    "CleanDistribution",
    "LogisticProbe",
    "NextTokenStats",
    "ReconstructionStats",
    "SAEs",
    "attach_probing",
    "ce_loss_score",
    "density_histogram",
    "eval_token_ids",
    "evaluate",
    "evaluate_tokens",
    "format_table",
    "health",
    "health_warning",
    "kl_div_score",
    "norm_limit",
    "plot_density",
    "plot_frontier",
    "plot_heatmap",
    "plot_position_error",
    "plot_training_log",
    "pooled_activations",
    "probe_accuracies",
    "probing_table",
    "replaced_at",
    "sae_site",
    "sparse_probing",
    "splice",
    "summary",
    "to_json",
    "top_k_by_mean_difference",
    "write_eval",
    "write_report",
    "zero_ablate",
]
