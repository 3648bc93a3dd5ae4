"""Checkpoints, the training log and resume. Owns `run_dir/checkpoints/NAME/` (`state.pt` while a run
trains, written atomically; `done.json` once it finished, its output folders relative to the run folder), the run key that says whether a checkpoint
belongs to this very run (and, if not, which settings differ), and `report/NAME_log.jsonl` (its plot
is `evals.report.plot_training_log`).

Knows nothing of how a step trains, of the recipe's numbers or of processes: a checkpoint stores the
states the loop hands it (weights, optimiser states, counts), the step and the torch RNG.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from gemmascope.activations import ActivationStore
from gemmascope.errors import StoreError
from gemmascope.runs import CFG_FILE, disk_errors, run_path, save_atomic, stored_path, write_atomic
from gemmascope.train.config import TrainConfig, TrainSpec


def run_key(store: ActivationStore, specs: list[TrainSpec], tokens: int, cfg: TrainConfig) -> str:
    """What makes two runs the same run: the store's data, the specs, the tokens and every setting
    that changes the numbers (not how often we log or checkpoint)."""
    settings = {
        f.name: getattr(cfg, f.name)
        for f in fields(cfg)
        # refit_dtype: the refit's arithmetic, not the run (runs from before it keep resuming)
        if f.name not in ("checkpoint_every", "log_every", "name", "parallel", "device", "refit_dtype")
    }
    if settings.get("step_dtype") == "float32":
        del settings["step_dtype"]  # the steps as before it existed: those runs keep resuming
    data = {
        s: [e["sha256"] for e in store.manifest(s)["shards"]]
        for s in sorted({n for t in specs for n in t.sites})
    }
    return json.dumps(
        {"specs": [_spec_key(s) for s in specs], "tokens": tokens, "config": settings, "data": data},
        sort_keys=True,
    )


def _spec_key(spec: TrainSpec) -> dict[str, object]:
    """A spec as its run key has it: an SAE's leaves out the transcoder fields (None, False), so
    checkpoints written before transcoders (and Matryoshka) existed still resume."""
    key = asdict(spec)
    if spec.out_site is None and not spec.skip:
        del key["out_site"], key["skip"]
    if not spec.matryoshka:
        del key["matryoshka"]
    return key


class Checkpoint:
    """`run_dir/checkpoints/NAME/`: `state.pt` (weights, optimiser states, counts, step, RNG) while
    training, written atomically; `done.json` (the run key and its output folders: SAEs, a CLT) once finished."""

    def __init__(self, folder: Path, key: str, marker: str = CFG_FILE) -> None:
        """`marker`: the file every output folder of a finished run holds (an SAE's cfg.json, a
        cross-layer transcoder's clt.json)."""
        self.folder = folder
        self.run_dir = folder.parent.parent  # run_dir/checkpoints/NAME
        self.key = key
        self.marker = marker
        self.state_path = folder / "state.pt"
        self.done_path = folder / "done.json"

    def finished_outputs(self) -> list[Path] | None:
        """The output folders of this very run if it already finished and they are all still there."""
        if not self.done_path.exists():
            return None
        try:
            done = json.loads(self.done_path.read_text())
            outputs, key = [run_path(self.run_dir, p) for p in done["outputs"]], done["key"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise StoreError(
                f"training record {str(self.done_path)!r} is damaged ({err!r}): delete it to train this run again"
            ) from None
        if key == self.key and all((p / self.marker).exists() for p in outputs):
            return outputs
        return None

    def load(self, restart: bool) -> dict[str, Any] | None:
        if not self.state_path.exists():
            return None
        try:
            state: dict[str, Any] = torch.load(self.state_path, weights_only=False)
        except Exception as err:  # a torn file cannot happen (atomic writes), but a foreign one can
            raise StoreError(f"cannot read checkpoint {str(self.state_path)!r}: {err}") from err
        if state.get("key") == self.key:
            return state
        if restart:
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank reads it, rank 0 deletes it
                self.state_path.unlink(missing_ok=True)
            return None
        raise StoreError(
            f"{str(self.state_path)!r} is an unfinished training run (step {state.get('step')}) of another "
            f"config ({_key_difference(state.get('key'), self.key)}); re-run with its arguments to resume it, "
            "restart to discard it, or choose another name"
        )

    def save(self, step_index: int, trainee_states: list[dict[str, Any]]) -> None:
        """Write the state after `step_index` steps: each SAE's state as the loop hands it over
        and the torch RNG."""
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {
            "key": self.key,
            "step": step_index,
            "trainees": trainee_states,
            "torch_rng": torch.get_rng_state(),
        }
        save_atomic(self.state_path, lambda tmp: torch.save(state, tmp))

    def finish(self, outputs: list[Path]) -> None:
        write_atomic(
            self.done_path,
            json.dumps(
                {"key": self.key, "outputs": [stored_path(self.run_dir, p) for p in outputs]}, indent=1
            ),
        )
        self.state_path.unlink(missing_ok=True)


def _key_difference(old: str | None, new: str) -> str:
    """Which parts of two run keys differ, for the error message."""
    try:
        a, b = json.loads(old or "{}"), json.loads(new)
    except json.JSONDecodeError:
        return "unreadable key"
    diffs = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if "config" in diffs:
        ca, cb = a.get("config", {}), b.get("config", {})
        diffs.remove("config")
        diffs += [
            f"{k}: {ca.get(k)!r} -> {cb.get(k)!r}"
            for k in sorted(set(ca) | set(cb))
            if ca.get(k) != cb.get(k)
        ]
    hint = ""
    if any(d.startswith("step_dtype: None") for d in diffs):
        hint = " (trained before --step-dtype existed, in float32: resume it with --step-dtype float32)"
    return "differs in " + ", ".join(diffs) + hint


class TrainingLog:
    """The training log, one JSON object per logged step; a resumed run drops rows after its
    checkpoint, and a torn last line (a crash in the middle of an append) with them."""

    def __init__(self, path: Path, resume_after: int, write: bool = True) -> None:
        self.path = path
        self.file: Any = None
        if not write:  # a data-parallel rank other than 0: rank 0 logs the shared steps
            return
        kept = [row for row in _rows(path) if row["step"] <= resume_after] if resume_after else []
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
        with disk_errors(path):
            self.file = open(path, "a")  # noqa: SIM115 - closed by close()

    def write(self, row: dict[str, Any]) -> None:
        if self.file is not None:
            with disk_errors(self.path):
                self.file.write(json.dumps(row) + "\n")
                self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _rows(path: Path) -> list[dict[str, Any]]:
    """The log's rows: each line a JSON object with its integer `step`; a line that is not one (the
    torn end a killed append leaves, or bytes that are not UTF-8) is left out."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as err:
        raise StoreError(f"cannot read training log {str(path)!r}: {err.strerror or err}") from None
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def read_training_log(path: Path | str) -> Iterator[dict[str, Any]]:
    """The rows of a training log (`report/NAME_log.jsonl`), a torn last line left out."""
    yield from _rows(Path(path))
