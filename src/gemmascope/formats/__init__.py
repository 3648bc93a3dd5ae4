"""SAE files (RECIPE.md section 5). Owns saving and loading SAEs in the formats users have, one file
each: `native` (our folder, which is a SAELens folder: `cfg.json`, `sae_weights.safetensors`,
`sparsity.safetensors`; and SAELens folders written by SAELens), `gemma_scope` (Gemma Scope
`params.npz`; Gemma Scope 2 `params.safetensors` with lower-case keys and its `config.json`),
`convert` (`load_sae` from any of them, `convert` between them) and `weights` (the tensors an
architecture saves, the checks every loader makes). Where SAE folders live in a run folder is
runs/'s.

Knows nothing of training: a saved SAE takes raw activations (the trainer folds its input scaling in
before saving). What an architecture saves and under which names is its own (`sae.Architecture`:
`as_saved`, `saelens_name`, `extra_tensors`). Every loader checks keys, shapes and finiteness and
raises FormatError naming the file and what was expected.
"""

from gemmascope.formats.convert import CONVERT_FORMATS, convert, load_sae
from gemmascope.formats.gemma_scope import (
    GS2_FILE,
    NPZ_FILE,
    PARAM_NAMES,
    save_params_npz,
    save_params_safetensors,
)
from gemmascope.formats.native import load_log10_density, save_sae

# Re-exported: the run folder's names (runs/), kept importable here for old imports.
from gemmascope.runs import find_saes as find_saes
from gemmascope.runs import sae_dir as sae_dir
from gemmascope.runs import sae_id as sae_id

__all__ = [
    "CONVERT_FORMATS",
    "GS2_FILE",
    "NPZ_FILE",
    "PARAM_NAMES",
    "convert",
    "find_saes",
    "load_log10_density",
    "load_sae",
    "sae_dir",
    "sae_id",
    "save_params_npz",
    "save_params_safetensors",
    "save_sae",
]
