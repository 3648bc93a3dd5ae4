"""The activation store. Owns harvesting model sites to disk (one forward pass feeds every site),
the on-disk layout of shards and manifests, resuming a killed harvest, and reading activations back in
order or as shuffled batches.

Knows nothing of what consumes the activations: SAEs, trainers, evals.

Layout of a run folder:

    runs/NAME/activations/SITE/layer_L/
      shard-00000.safetensors   "acts" [rows, context_len, d_in] in the store's dtype,
                                "token_ids" [rows, context_len] int32
      manifest.json             model, corpus, split, site, dtype, token counts, the scale C, and the
                                list of complete shards (rows, bytes, SHA-256, sum of squares)

Rows are stored whole, special positions included; the manifest's `special_ids` (BOS, EOS, pad) mark
the positions every reader skips. The token ids of each row live in the shards beside the activations
(`ActivationStore.token_ids()`), not inline in the JSON, and the manifest holds their hash per shard.

Every file is written under a temporary name and renamed when complete (runs.write_atomic); a shard
exists for readers only once the manifest lists it. Readers check each shard's size and, once per
shard per process, its SHA-256, so a damaged shard is an error naming it, never wrong activations. The rows to harvest are a pure function of (corpus, split,
context_len) and every shard is computed from the same batches whether or not the harvest was
interrupted, so a resumed harvest writes the same bytes as an uninterrupted one.

Parts: `harvesting.py` (harvest, its checks, the shard writer, resume), `store.py` (ActivationStore:
reading, verifying, shuffled batches), `shards.py` (the manifest format and shard hashes both share).
"""

from gemmascope.activations.harvesting import (
    DEFAULT_BATCH_ROWS,
    DEFAULT_SHARD_TOKENS,
    DTYPES,
    check_request,
    dtype_name,
    harvest,
)
from gemmascope.activations.shards import _VERIFIED, STORE_FORMAT
from gemmascope.activations.store import ActivationStore

__all__ = [
    "DEFAULT_BATCH_ROWS",
    "DEFAULT_SHARD_TOKENS",
    "DTYPES",
    "STORE_FORMAT",
    "_VERIFIED",
    "ActivationStore",
    "check_request",
    "dtype_name",
    "harvest",
]
