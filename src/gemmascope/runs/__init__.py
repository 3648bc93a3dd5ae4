"""The run folder. Owns its layout and file names, SAE ids and finding SAEs, resolving the run folder
a command is given, its JSON files, the one rule for which model a set of SAEs belongs to
(`model_for`), the one atomic write, a failing disk as one StoreError, the one-writer lock and the
name checks that keep a user-given name inside the run folder. One module each: `layout` (names,
ids, finding and resolving), `writes` (the atomic write, disk failures, the lock) and `reading` (its
JSON files, `model_for`); everything public is importable from `gemmascope.runs`. Opening a run
(its SAEs, model and feature index: `open_run`) is `gemmascope.opening`'s, above the file readers.

    runs/NAME/
      run.json, suite.json                  what was asked; which suite stages are finished
      activations/SITE/layer_L/             shards + manifest.json
      heldout/activations/SITE/layer_L/     the same for a slice of the held-out split (HELDOUT; when
                                            harvested, training names SAEs by their L0 there)
      saes/SITE/layer_L/width_W/l0_K/       cfg.json, sae_weights.safetensors, sparsity.safetensors, eval.json
      checkpoints/NAME/                     state.pt, done.json (training; its SAE folders relative)
      features.sqlite                       the feature index
      graphs/, report/                      attribution graphs; evals.json, plots, training logs
      effects/SAE_ID/LATENT.json            a latent's measured output effects (a cache: outputs.py)
      .lock                                 held by the one writer

A path a run file records is relative to the run folder (`stored_path`, `run_path`), so a copied or
moved run folder names its own files. Knows nothing of what is inside the files (see activations/,
formats/, train/, features/): every reader of them imports this package, and it imports none of them.
"""

from gemmascope.runs.layout import (
    ACTIVATIONS,
    CFG_FILE,
    CHECKPOINTS,
    CLTS,
    EFFECTS,
    EVAL_FILE,
    EVALS_JSON,
    FEATURES_DB,
    GRAPHS,
    HELDOUT,
    LOCK_FILE,
    MANIFEST,
    MAX_NAME,
    REPLACEMENT_JSON,
    REPORT,
    RUN_JSON,
    SAES,
    SPARSITY_FILE,
    SUITE_JSON,
    SUMMARY_TXT,
    TMP_SUFFIX,
    WEIGHTS_FILE,
    check_name,
    clt_layer_id,
    find_clts,
    find_saes,
    is_sae_folder,
    resolve_saes,
    run_of,
    run_path,
    sae_dir,
    sae_id,
    sae_order,
    stored_path,
)
from gemmascope.runs.reading import model_for, read_json, read_run_json
from gemmascope.runs.writes import (
    disk_errors,
    disk_failure,
    free_folder,
    held_by_writer,
    lock,
    locked_run,
    run_holding,
    save_atomic,
    tmp_path,
    write_atomic,
    writing,
)

__all__ = [
    "ACTIVATIONS",
    "CFG_FILE",
    "CHECKPOINTS",
    "EFFECTS",
    "EVALS_JSON",
    "EVAL_FILE",
    "FEATURES_DB",
    "GRAPHS",
    "HELDOUT",
    "LOCK_FILE",
    "MANIFEST",
    "MAX_NAME",
    "REPLACEMENT_JSON",
    "REPORT",
    "RUN_JSON",
    "SAES",
    "CLTS",
    "SPARSITY_FILE",
    "SUITE_JSON",
    "SUMMARY_TXT",
    "TMP_SUFFIX",
    "WEIGHTS_FILE",
    "check_name",
    "disk_errors",
    "disk_failure",
    "free_folder",
    "find_saes",
    "find_clts",
    "held_by_writer",
    "is_sae_folder",
    "lock",
    "locked_run",
    "model_for",
    "read_json",
    "read_run_json",
    "resolve_saes",
    "run_holding",
    "run_of",
    "run_path",
    "sae_dir",
    "sae_id",
    "clt_layer_id",
    "sae_order",
    "save_atomic",
    "stored_path",
    "tmp_path",
    "write_atomic",
    "writing",
]
