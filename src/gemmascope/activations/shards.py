"""The on-disk format of the activation store, shared by its writer (`harvesting.py`) and its reader
(`store.py`): the manifest's format name and required keys, the hash of a shard's token ids, checking a
listed shard against its manifest entry (size always, SHA-256 once per process), reading a shard's
tensors, and reading a run folder's manifests.

Knows nothing of running a model, of how shards are computed, or of how they are batched for training.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gemmascope.errors import StoreError
from gemmascope.runs import MANIFEST
from gemmascope.sites import Site

STORE_FORMAT = "gemmascope-activations/1"
# Fields that make a run folder one store: every site in it must agree on them.
IDENTITY = ("model", "corpus", "split", "context_len", "shard_rows")
# Keys every manifest and every shard entry of it must have (readers use them all).
_MANIFEST_KEYS = (
    *IDENTITY, "format", "site", "kind", "layer", "d_in", "dtype", "special_ids", "shards", "complete",
    "n_rows", "n_rows_target", "n_tokens", "n_tokens_non_special", "scale",
)  # fmt: skip
_SHARD_KEYS = ("file", "rows", "bytes", "sha256", "token_ids_sha256", "sum_sq", "n_non_special")


def tensor_sha256(tensor: Tensor) -> str:
    """SHA-256 of a tensor's bytes (a shard's token ids, as int32), as the manifest records it."""
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def verify_shard(path: Path, entry: dict[str, Any], full: bool) -> None:
    """Check a listed shard's size (and with `full` its SHA-256)."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise StoreError(
            f"shard {str(path)!r} listed in the manifest is missing ({err.strerror}); run harvest again to rewrite it"
        ) from err
    if size != entry["bytes"]:
        raise StoreError(
            f"shard {str(path)!r} is truncated or damaged: {size} bytes on disk, the manifest says {entry['bytes']}; "
            "delete it and run harvest again to rewrite it"
        )
    if full:
        _check_sha256(path, entry, path.read_bytes())


def _check_sha256(path: Path, entry: dict[str, Any], data: bytes | memoryview) -> None:
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise StoreError(
            f"shard {str(path)!r} is damaged: its SHA-256 differs from the manifest's; "
            "delete it and run harvest again to rewrite it"
        )


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Every key readers use is there, and every shard entry is complete."""
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    shards = manifest.get("shards")
    if not missing and not (isinstance(shards, list) and all(isinstance(e, dict) for e in shards)):
        missing = ["shards (a list of shard entries)"]
    for i, entry in enumerate(shards if not missing and isinstance(shards, list) else []):
        missing += [f"shards[{i}].{key}" for key in _SHARD_KEYS if key not in entry]
    if missing:
        raise StoreError(
            f"activation manifest {str(path)!r} is damaged: it lacks {', '.join(missing[:5])}"
            f"{' and more' if len(missing) > 5 else ''}; harvest into a new run folder"
        )


# Shards whose SHA-256 this process has checked, by (path, sha256): each is hashed once per process
# (about 1 s per GB), so a flipped byte is caught the first time a shard is read, not only on resume.
_VERIFIED: set[tuple[str, str]] = set()


def read_verified(path: Path, entry: dict[str, Any], scratch: bytearray | None = None) -> memoryview:
    """A listed shard's bytes, checked against the manifest (size always, SHA-256 once per process),
    read into `scratch` when it is large enough (the bytes are then a view of it, good until its next
    use), else into memory of their own. Reading into the same scratch again costs no new pages: a
    fresh 84 MB `bytes` a shard took 40 ms of page faults, a third of reading the whole store for
    training."""
    verify_shard(path, entry, full=False)
    size = int(entry["bytes"])
    data = memoryview(scratch if scratch is not None and len(scratch) >= size else bytearray(size))[:size]
    try:
        with open(path, "rb") as f:
            done = 0
            while done < size:
                got = f.readinto(data[done:])
                if not got:
                    break
                done += got
    except OSError as err:
        raise StoreError(f"cannot read shard {str(path)!r}: {err.strerror or err}") from None
    if done < size:
        raise StoreError(f"shard {str(path)!r} ended after {done} of its {size} bytes; run harvest again")
    key = (str(path.resolve()), str(entry["sha256"]))
    if key not in _VERIFIED:
        _check_sha256(path, entry, data)
        _VERIFIED.add(key)
    return data


# safetensors' dtype names, for the tensors a shard holds
_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I32": torch.int32,
    "I64": torch.int64,
}


def shard_tensors(path: Path, data: memoryview) -> dict[str, Tensor]:
    """The tensors of a shard's safetensors bytes, as views into `data` (no copy: the format is an
    8-byte header length, a JSON header of names, dtypes, shapes and offsets, then the data), each
    checked to lie within the data and to fill its shape."""
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(bytes(data[8 : 8 + n]))
        if not isinstance(header, dict) or 8 + n > len(data):
            raise ValueError("its header is not a safetensors header")
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, (start, end), shape = _DTYPES[info["dtype"]], info["data_offsets"], info["shape"]
            count = math.prod(shape)
            if not 0 <= start <= end <= len(data) - 8 - n or end - start != count * dtype.itemsize:
                raise ValueError(f"tensor {name!r} has offsets {start}-{end} for shape {shape}")
            flat = torch.frombuffer(data, dtype=dtype, count=count, offset=8 + n + start) if count else None
            tensors[name] = torch.empty(shape, dtype=dtype) if flat is None else flat.view(shape)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
        raise StoreError(f"cannot read shard {str(path)!r}: {err}; delete it and run harvest again") from None
    return tensors


def read_manifests(root: Path) -> dict[Site, dict[str, Any]]:
    """Every site manifest under `root` (a run folder's `activations/`), checked for format and keys."""
    manifests: dict[Site, dict[str, Any]] = {}
    for path in sorted(root.glob(f"*/layer_*/{MANIFEST}")):
        try:
            manifest = json.loads(path.read_text())
            site = Site(manifest["kind"], int(manifest["layer"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StoreError(f"cannot read activation manifest {str(path)!r}: {err!r}") from err
        if manifest.get("format") != STORE_FORMAT:
            raise StoreError(
                f"{str(path)!r} has format {manifest.get('format')!r}, expected {STORE_FORMAT!r}"
            )
        _check_manifest(path, manifest)
        manifests[site] = manifest
    return manifests
