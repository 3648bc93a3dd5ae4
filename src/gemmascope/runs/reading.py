"""Reading a run's own files: its JSON files (`read_json`, `read_run_json`) and the one rule for which
model a set of SAEs belongs to (`model_for`).

Knows nothing of what is inside the SAE files: opening a run's SAEs, model and feature index is
`gemmascope.opening`'s (it hands the files to their readers, which import this package).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemmascope.errors import ConfigError, StoreError
from gemmascope.runs.layout import RUN_JSON

if TYPE_CHECKING:
    from gemmascope.sae import SAE


def read_json(path: Path | str, what: str) -> dict[str, Any]:
    """A JSON object file of a run folder (run.json, suite.json, eval.json, ...); a StoreError
    naming it and `what` it is when it is unreadable, damaged or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise StoreError(
            f"{what} {str(path)!r} is unreadable or damaged ({why}); restore or delete it"
        ) from None
    if not isinstance(data, dict):
        raise StoreError(
            f"{what} {str(path)!r} is damaged: expected a JSON object, found {type(data).__name__}"
        )
    return data


def read_run_json(run_dir: Path | str) -> dict[str, Any]:
    """What `run.json` records ({} without one); a damaged one is a StoreError naming it (`read_json`)."""
    path = Path(run_dir) / RUN_JSON
    return read_json(path, "run description") if path.is_file() else {}


def model_for(
    saes: Iterable[SAE], run_dir: Path | str | None = None, model: str | None = None, what: str = "the SAEs"
) -> str:
    """The model a set of SAEs belongs to, the one rule of every command and the server: `model`
    when given (--model); else the run folder's (`run.json`'s "model"); else the one model the SAEs'
    metadata names (cfg.json `metadata.model_name`; an SAE naming none does not count). A
    ConfigError when they name several, or none."""
    if model:
        return model
    named = read_run_json(run_dir).get("model") if run_dir is not None else None
    if not isinstance(named, str | None):
        raise StoreError(
            f"run description {str(Path(str(run_dir)) / RUN_JSON)!r} is damaged: its model {named!r} is not a name"
        )
    if named:
        return named
    names = sorted({sae.cfg.model_name for sae in saes if sae.cfg.model_name})
    if len(names) == 1:
        return names[0]
    found = f": found {', '.join(names)}" if names else ""
    raise ConfigError(
        f"{what} name no single model in their metadata (cfg.json 'metadata.model_name'{found}): "
        "pass --model NAME"
    )
