"""What a latent does to the output, measured, for its feature page, `GET /v1/feature/{sae_id}/{index}/
outputs` and `gemmascope inspect --feature N`: `effects.output_effects` (the latent's decoder
direction added at its site, `steer`'s one way to turn a latent up, over `effects.OUTPUT_PROMPTS`)
at its max activation on the index corpus (the steering default strength), computed on demand for
one latent (a second or two on a CPU; every latent of a 4096-wide SAE at index-build time would take
more than an hour) and kept in the run folder as `RUN/effects/SAE_ID/LATENT.json`.

The cache is written as every run file is (`runs.write_atomic`: under the run folder's lock, renamed
into place when complete, a failing disk one StoreError). An entry records what it was measured with
(the SAE's fingerprint in the index, the model, the strength, the prompts, `VERSION`) and is measured
again when any of them differs. A cache that cannot be written (another process holds the run's
lock, a full or read-only disk) leaves the measured answer as it is, saying why it was not kept; a
damaged entry is measured again and replaced.

Knows the run through `opening.OpenRun`; knows nothing of HTTP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gemmascope.effects import OUTPUT_PROMPTS, output_effects
from gemmascope.errors import ConfigError, StoreError
from gemmascope.opening import OpenRun
from gemmascope.runs import EFFECTS, check_name, read_json, write_atomic

VERSION = 2  # of the measurement: a cache entry of another version is measured again (2: a CLT layer
# writes each later layer by its own decoder part, `SAE.writes`)


def cache_path(run_dir: Path, key: str, latent: int) -> Path:
    """`run_dir/effects/SAE_ID/LATENT.json` (an official release's `RELEASE/ID` with "." for "/")."""
    return run_dir / EFFECTS / check_name(key.replace("/", "."), "SAE id") / f"{int(latent)}.json"


def latent_outputs(opened: OpenRun, key: str, latent: int, *, refresh: bool = False) -> dict[str, Any]:
    """The output effects of latent `latent` of SAE `key` of an open run (`effects.output_effects`'s
    dict), from the cache when it holds them for the same SAE, model, strength and prompts (unless
    `refresh`), else measured and cached, with `cached` (bool) and, when the answer could not be
    kept, `not_cached` (why). A latent that never fired on the index corpus has no strength to be
    turned up by: its answer has empty lists and a `note`, and the model does not run.

    ConfigError: an unknown SAE or a latent out of range. StoreError: the index does not describe
    the SAE (its max activation is the strength)."""
    if key not in opened.saes:
        raise ConfigError(f"no SAE {key!r} is open: expected one of {', '.join(opened.saes)}")
    sae = opened.saes[key]
    if isinstance(latent, bool) or not 0 <= int(latent) < sae.d_sae:
        raise ConfigError(f"latent {latent!r} is out of range: expected 0..{sae.d_sae - 1}")
    why = opened.not_indexed(key)
    max_acts = opened.column(key, "max_act")
    if why or max_acts is None:
        raise StoreError(
            f"{why or 'not indexed'}: a latent's output effects turn it up by its max activation in the feature index"
        )
    strength = float(max_acts[int(latent)])
    measured_with = {
        "version": VERSION,
        "model": opened.model_name,
        "sae": opened.feature_index().sae_info(key)["fingerprint"],
        "strength": strength,
        "prompts": list(OUTPUT_PROMPTS),
    }
    path = cache_path(opened.run_dir, key, latent) if opened.run_dir is not None else None
    if path is not None and not refresh and (kept := _read(path, measured_with)) is not None:
        return {**kept, "cached": True}
    if strength > 0:
        effects = output_effects(opened.model, sae, int(latent), strength)
    else:
        effects = {
            "latent": int(latent), "strength": 0.0, "prompts": list(OUTPUT_PROMPTS), "rose": [], "fell": [],
            "kl": 0.0, "note": "never fired on the index corpus: there is no strength to turn it up by",
        }  # fmt: skip
    if path is None:
        return {**effects, "cached": False, "not_cached": "served without a run folder"}
    try:
        write_atomic(path, json.dumps({"measured_with": measured_with, "effects": effects}))
    except StoreError as err:  # the run's lock held by another writer, a full or read-only disk
        return {**effects, "cached": False, "not_cached": str(err)}
    return {**effects, "cached": False}


def _read(path: Path, measured_with: dict[str, Any]) -> dict[str, Any] | None:
    """The effects a cache entry holds when it was measured as `measured_with` says; None when there
    is none, it was measured otherwise, or it is damaged (measured again, and replaced)."""
    if not path.is_file():
        return None
    try:
        entry = read_json(path, "a cached output effect")
    except StoreError:
        return None
    effects = entry.get("effects")
    if entry.get("measured_with") != measured_with or not isinstance(effects, dict):
        return None
    return effects
