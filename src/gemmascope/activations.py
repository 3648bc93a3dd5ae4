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

Every file is written under a temporary name and renamed when complete; a shard exists for readers
only once the manifest lists it. The rows to harvest are a pure function of (corpus, split,
context_len) and every shard is computed from the same batches whether or not the harvest was
interrupted, so a resumed harvest writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor
from tqdm import tqdm

from gemmascope.corpus import DEFAULT_CORPUS, SPLITS, load_corpus, pack, source_name, special_mask
from gemmascope.errors import ConfigError, CorpusError, StoreError
from gemmascope.models import SITE_KINDS, LanguageModel, Site, capture, parse_site, site_d_in

STORE_FORMAT = "gemmascope-activations/1"
MANIFEST = "manifest.json"
DEFAULT_SHARD_TOKENS = 2**15  # tokens per shard unless shard_rows is given: ~84 MB at d_in 640 in fp32
DEFAULT_BATCH_ROWS = 16  # rows per forward pass
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
# Fields that make a run folder one store: every site in it must agree on them.
_IDENTITY = ("model", "corpus", "split", "context_len", "shard_rows")


# ---------------------------------------------------------------------------------------------
# Harvest


def harvest(
    model: LanguageModel,
    sites: Sequence[Site | str],
    run_dir: Path | str,
    n_tokens: int,
    corpus: str = DEFAULT_CORPUS,
    context_len: int = 128,
    dtype: str = "float32",
    shard_rows: int | None = None,
    batch_rows: int | None = None,
    split: str = "train",
    progress: bool = True,
) -> ActivationStore:
    """Harvest `n_tokens` tokens of `corpus` at every site in one forward pass per batch, into
    `run_dir/activations/{site.folder}/`, and return the store.

    `n_tokens` is rounded up to whole rows of `context_len` (the manifest records both numbers).
    Rows come from `pack(load_corpus(corpus, split), context_len)`. Shards hold `shard_rows` rows
    (default: 32,768 tokens' worth), computed `batch_rows` rows per forward pass. Activations are stored
    in `dtype` (float32, float16 or bfloat16; fp32/fp16/bf16 are accepted).

    Resumable: run it again with the same arguments after a crash or kill and it verifies the shards
    already listed (size and SHA-256), recomputes from the first missing one and ends with exactly the
    rows asked for. Asking for more tokens than a finished harvest holds extends it; a folder holding
    another model's, corpus's, split's or context length's activations is refused."""
    sites = _check_sites(model, sites)
    dtype_name = _dtype_name(dtype)
    if n_tokens < 1:
        raise ConfigError(f"n_tokens {n_tokens} must be at least 1")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    if not 2 <= context_len <= model.max_context:
        raise ConfigError(
            f"context length {context_len} is out of range for model {model.name!r}: expected 2..{model.max_context}"
        )
    if batch_rows is not None and batch_rows < 1:
        raise ConfigError(f"batch_rows {batch_rows} must be at least 1")
    if shard_rows is not None and shard_rows < 1:
        raise ConfigError(f"shard_rows {shard_rows} must be at least 1")

    root = Path(run_dir) / "activations"
    existing = _read_manifests(root)
    identity: dict[str, Any] = {
        "model": model.name,
        "corpus": source_name(corpus),
        "split": split,
        "context_len": context_len,
    }
    for site, manifest in existing.items():
        for key, value in identity.items():
            if manifest.get(key) != value:
                raise StoreError(
                    f"run folder {str(run_dir)!r} holds activations of {key} {manifest.get(key)!r} (at {site}), "
                    f"not {value!r}; use another run folder"
                )
    identity["shard_rows"] = _agreed(
        existing, "shard_rows", shard_rows, max(1, DEFAULT_SHARD_TOKENS // context_len)
    )

    n_rows = math.ceil(n_tokens / context_len)
    shard_ranges = [
        (a, min(a + identity["shard_rows"], n_rows)) for a in range(0, n_rows, identity["shard_rows"])
    ]
    rows = pack(model.tokenizer, load_corpus(corpus, split), context_len, max_rows=n_rows)
    if len(rows) < n_rows:
        raise CorpusError(
            f"corpus {corpus!r} (split {split!r}) gives {len(rows)} rows of {context_len} tokens "
            f"({len(rows) * context_len} tokens), fewer than the {n_tokens} tokens asked for"
        )
    special_ids = model.special_token_ids
    is_special = special_mask(rows, special_ids)

    ours = {site: existing[site] for site in sites if site in existing}
    batch_rows = _agreed(ours, "batch_rows", batch_rows, DEFAULT_BATCH_ROWS)
    for site, old in ours.items():
        if old["dtype"] != dtype_name:
            raise StoreError(
                f"{site} in {str(root)!r} is stored as {old['dtype']}, not {dtype_name}; use another run folder"
            )
    writers: dict[Site, _SiteWriter] = {}
    for site in sites:
        manifest = {
            "format": STORE_FORMAT,
            **identity,
            "site": str(site),
            "kind": site.kind,
            "layer": site.layer,
            "hook_name": site.hook_name,
            "d_in": site_d_in(model, site),
            "dtype": dtype_name,
            "batch_rows": batch_rows,
            "special_ids": sorted(special_ids),
            "n_tokens_requested": n_tokens,
            "n_rows_target": n_rows,
            "n_tokens_target": n_rows * context_len,
            "n_tokens_note": "n_tokens_requested rounded up to whole rows of context_len",
            "shards": [],
        }
        writers[site] = _SiteWriter(root / site.folder, manifest, shard_ranges)
        writers[site].keep_verified(existing.get(site), rows)
    for writer in writers.values():  # only once every site has passed its checks
        writer.start()
    _harvest_shards(model, rows, is_special, writers, shard_ranges, batch_rows, DTYPES[dtype_name], progress)
    return ActivationStore(run_dir)


def _harvest_shards(
    model: LanguageModel,
    rows: Tensor,
    is_special: Tensor,
    writers: dict[Site, _SiteWriter],
    shard_ranges: list[tuple[int, int]],
    batch_rows: int,
    dtype: torch.dtype,
    progress: bool,
) -> None:
    """Compute and write every shard not yet complete for some site: `rows [n_rows, ctx]` in forward
    passes of `batch_rows` rows, each capturing all the sites that still need that shard."""
    context_len = rows.shape[1]
    done = {site: writer.n_done for site, writer in writers.items()}
    first = min(done.values())
    bar = tqdm(
        total=shard_ranges[-1][1] * context_len,
        initial=shard_ranges[first][0] * context_len
        if first < len(shard_ranges)
        else shard_ranges[-1][1] * context_len,
        unit="tok",
        unit_scale=True,
        desc=f"harvest {', '.join(map(str, writers))}",
        disable=not progress,
    )
    # One background thread serialises, hashes and writes shard i while the model computes shard i+1;
    # waiting for shard i-1's writes before queueing shard i bounds memory to two shards per site.
    with bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as pool:
        pending: list[Future[None]] = []
        for index in range(first, len(shard_ranges)):
            todo = [site for site in writers if done[site] <= index]
            start, stop = shard_ranges[index]
            acts = {  # (rows, ctx, d_in) per site
                site: torch.empty((stop - start, context_len, writers[site].manifest["d_in"]), dtype=dtype)
                for site in todo
            }
            sum_sq = dict.fromkeys(todo, 0.0)
            for a in range(start, stop, batch_rows):
                b = min(a + batch_rows, stop)
                captured = capture(model, rows[a:b].to(model.device), todo)
                keep = ~is_special[a:b]
                for site in todo:
                    stored = captured[site].to("cpu", dtype)
                    acts[site][a - start : b - start] = stored
                    # C is measured on the values as stored, so it matches what readers get back.
                    sum_sq[site] += float(stored[keep].float().pow(2).sum(dtype=torch.float64))
                bar.update((b - a) * context_len)
            for future in pending:
                future.result()
            n_real = int((~is_special[start:stop]).sum())
            pending = [
                pool.submit(
                    writers[site].write_shard, index, acts[site], rows[start:stop], sum_sq[site], n_real
                )
                for site in todo
            ]
        for future in pending:
            future.result()


def _check_sites(model: LanguageModel, sites: Sequence[Site | str]) -> list[Site]:
    if not sites:
        raise ConfigError("harvest needs at least one site, e.g. 'resid_post.6'")
    checked: list[Site] = []
    for spec in sites:
        site = parse_site(spec, model.n_layers)
        if site.kind not in SITE_KINDS:
            raise ConfigError(
                f"unknown site kind {site.kind!r} in {spec!r}: expected one of {', '.join(SITE_KINDS)}"
            )
        if site not in checked:
            checked.append(site)
    return checked


def _dtype_name(dtype: str) -> str:
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ConfigError(
            f"unknown dtype {dtype!r}: expected one of float32, float16, bfloat16 (or fp32, fp16, bf16)"
        )
    return name


def _agreed(manifests: dict[Site, dict[str, Any]], key: str, asked: int | None, default: int) -> int:
    """The value of `key` the existing manifests agree on; `asked` must match it if given."""
    found = {m[key] for m in manifests.values() if key in m}
    if not found:
        return default if asked is None else asked
    value = found.pop()
    if asked is not None and asked != value:
        raise StoreError(
            f"this run folder was harvested with {key}={value}, not {asked}; leave {key} out to resume"
        )
    return int(value)


class _SiteWriter:
    """Writes one site's shards and keeps its manifest, the record of which shards are complete."""

    def __init__(self, folder: Path, manifest: dict[str, Any], shard_ranges: list[tuple[int, int]]) -> None:
        self.folder = folder
        self.manifest = manifest
        self.shard_ranges = shard_ranges

    @property
    def n_done(self) -> int:
        return len(self.manifest["shards"])

    def keep_verified(self, old: dict[str, Any] | None, rows: Tensor) -> None:
        """Keep the old manifest's shards that match this harvest's plan, after verifying them against
        their manifest entries and the expected `rows`; the rest will be recomputed. Writes nothing."""
        if old is not None:
            held = old["shards"][-1]["rows"][1] if old["shards"] else 0
            target = self.manifest["n_rows_target"]
            if held > target:
                raise StoreError(
                    f"{self.manifest['site']} in {str(self.folder)!r} already holds {held} rows, more than the "
                    f"{target} asked for; ask for at least {held * self.manifest['context_len']} tokens or use "
                    "another run folder"
                )
            for index, entry in enumerate(old["shards"]):
                if index >= len(self.shard_ranges) or tuple(entry["rows"]) != self.shard_ranges[index]:
                    break  # a short last shard of a smaller harvest: recompute it and what follows
                _verify_shard(self.folder / entry["file"], entry, full=True)
                start, stop = self.shard_ranges[index]
                if entry["token_ids_sha256"] != _sha256(rows[start:stop].to(torch.int32)):
                    raise StoreError(
                        f"shard {str(self.folder / entry['file'])!r} holds other tokens than corpus "
                        f"{self.manifest['corpus']!r} gives now; the corpus changed, use another run folder"
                    )
                self.manifest["shards"].append(entry)

    def start(self) -> None:
        """Clear temporary files a killed harvest left and write the manifest of the shards kept."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for tmp in self.folder.glob("*.tmp"):
            tmp.unlink()
        self._write_manifest()

    def write_shard(self, index: int, acts: Tensor, token_ids: Tensor, sum_sq: float, n_real: int) -> None:
        """Write shard `index` (`acts [rows, ctx, d_in]`, `token_ids [rows, ctx]`) and list it."""
        assert index == self.n_done, "shards are written in order"
        name = f"shard-{index:05d}.safetensors"
        ids32 = token_ids.to(torch.int32).contiguous()
        data = save_safetensors({"acts": acts.contiguous(), "token_ids": ids32})
        _atomic_write(self.folder / name, data)
        self.manifest["shards"].append(
            {
                "file": name,
                "rows": list(self.shard_ranges[index]),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "token_ids_sha256": _sha256(ids32),
                "sum_sq": sum_sq,
                "n_non_special": n_real,
            }
        )
        self._write_manifest()

    def _write_manifest(self) -> None:
        m = self.manifest
        shards = m["shards"]
        n_rows = shards[-1]["rows"][1] if shards else 0
        n_real = sum(s["n_non_special"] for s in shards)
        m["n_rows"] = n_rows
        m["n_tokens"] = n_rows * m["context_len"]
        m["n_tokens_non_special"] = n_real
        m["scale"] = math.sqrt(sum(s["sum_sq"] for s in shards) / n_real) if n_real else None
        m["complete"] = len(shards) == len(self.shard_ranges)
        _atomic_write(self.folder / MANIFEST, (json.dumps(m, indent=1) + "\n").encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _sha256(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def _verify_shard(path: Path, entry: dict[str, Any], full: bool) -> bytes | None:
    """Check a listed shard's size (and with `full` its SHA-256); return its bytes when read."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise StoreError(f"shard {str(path)!r} listed in the manifest is missing: {err}") from err
    if size != entry["bytes"]:
        raise StoreError(
            f"shard {str(path)!r} is truncated or damaged: {size} bytes on disk, the manifest says {entry['bytes']}; "
            "delete it and run harvest again to rewrite it"
        )
    if not full:
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise StoreError(f"shard {str(path)!r} is damaged: its SHA-256 differs from the manifest's")
    return data


def _read_manifests(root: Path) -> dict[Site, dict[str, Any]]:
    manifests: dict[Site, dict[str, Any]] = {}
    for path in sorted(root.glob(f"*/layer_*/{MANIFEST}")):
        try:
            manifest = json.loads(path.read_text())
            site = Site(manifest["kind"], int(manifest["layer"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StoreError(f"cannot read activation manifest {str(path)!r}: {err}") from err
        if manifest.get("format") != STORE_FORMAT:
            raise StoreError(
                f"{str(path)!r} has format {manifest.get('format')!r}, expected {STORE_FORMAT!r}"
            )
        manifests[site] = manifest
    return manifests


# ---------------------------------------------------------------------------------------------
# Reading


class ActivationStore:
    """A harvested activation store, `run_dir/activations`. Opening it reads only the manifests.

    Every site of a store shares the model, corpus, split, context length and shard layout; sites
    harvested together hold the same rows, so `batches` can serve several sites at the same tokens."""

    def __init__(self, run_dir: Path | str, allow_incomplete: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "activations"
        if not self.root.is_dir():
            raise StoreError(f"no activation store at {str(self.root)!r}: run `gemmascope harvest` first")
        self._manifests = _read_manifests(self.root)
        if not self._manifests:
            raise StoreError(f"activation store {str(self.root)!r} holds no site manifests")
        for site, m in self._manifests.items():
            if not m["complete"] and not allow_incomplete:
                raise StoreError(
                    f"the harvest of {site} in {str(self.root)!r} is incomplete ({len(m['shards'])} shards of "
                    f"{m['n_rows_target']} rows done); run harvest again to finish it"
                )
        self.sites: list[Site] = sorted(self._manifests)
        first = self._manifests[self.sites[0]]
        for site, m in self._manifests.items():
            for key in _IDENTITY:
                if m.get(key) != first.get(key):
                    raise StoreError(
                        f"store {str(self.root)!r} mixes {key} {first.get(key)!r} ({self.sites[0]}) and "
                        f"{m.get(key)!r} ({site})"
                    )
        self.model_name: str = first["model"]
        self.corpus: str = first["corpus"]
        self.split: str = first["split"]
        self.context_len: int = int(first["context_len"])
        self.special_ids: set[int] = set(first["special_ids"])

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.run_dir)!r}, model={self.model_name!r}, sites={[str(s) for s in self.sites]})"

    def manifest(self, site: Site | str) -> dict[str, Any]:
        """A copy of the site's manifest: `scale`, `n_tokens`, `n_rows`, `d_in`, `dtype`, `shards`, ..."""
        return json.loads(json.dumps(self._manifests[self._site(site)]))

    def scale(self, site: Site | str) -> float:
        """The scale C of a site: sqrt of the mean of ‖x‖² over non-special tokens, so E‖x/C‖² = 1."""
        scale = self._manifests[self._site(site)]["scale"]
        if scale is None:
            raise StoreError(f"{site} has no non-special tokens yet, so no scale")
        return float(scale)

    def token_ids(self) -> Tensor:
        """All rows' token ids `[rows, context_len]` (int64), in order (from the site with the most rows)."""
        site = max(self.sites, key=lambda s: self._manifests[s]["n_rows"])
        parts = []
        for path, entry in self._shards(site):
            _verify_shard(path, entry, full=False)
            try:
                with safe_open(str(path), framework="pt") as f:
                    parts.append(f.get_tensor("token_ids").long())
            except Exception as err:  # safetensors raises its own error types for damaged files
                raise StoreError(f"cannot read shard {str(path)!r}: {err}") from err
        return torch.cat(parts) if parts else torch.empty((0, self.context_len), dtype=torch.long)

    def rows(self, site: Site | str) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield `(acts [rows, ctx, d_in] fp32, token_ids [rows, ctx] int64)` shard by shard, in order."""
        site = self._site(site)
        for path, entry in self._shards(site):
            acts, ids = self._load(path, entry)
            yield acts.float(), ids

    def batches(
        self,
        sites: Sequence[Site | str],
        batch_size: int,
        seed: int = 0,
        buffer_tokens: int = 2**18,
        epochs: int = 1,
        rank: int = 0,
        world_size: int = 1,
        scaled: bool = False,
    ) -> Iterator[dict[Site, Tensor]]:
        """Yield shuffled batches `{site: [batch_size, d_in] fp32}` of non-special tokens; every site's
        batch holds the same token positions. With `scaled`, each site's activations are divided by C.

        Shuffling: each epoch visits this rank's shards in a random order, pours their tokens into a
        buffer and, once it holds `buffer_tokens`, serves random batches until half remains. Memory stays
        about `buffer_tokens` plus one shard's tokens per site. The order depends only on (seed, epoch,
        rank).

        Data-parallel (`world_size` > 1): rank r reads shards r, r+W, r+2W, ... and no others. Every
        rank yields the same number of batches per epoch, floor(min over ranks of its non-special tokens /
        batch_size), so all-reduce steps line up; the few tokens beyond that are skipped in that epoch."""
        chosen = [self._site(s) for s in sites]
        if not chosen:
            raise ConfigError("batches needs at least one site")
        if batch_size < 1:
            raise ConfigError(f"batch_size {batch_size} must be at least 1")
        if not 0 <= rank < world_size:
            raise ConfigError(
                f"rank {rank} is out of range for world_size {world_size}: expected 0..{world_size - 1}"
            )
        shards = self._shared_shards(chosen)
        if len(shards) < world_size:
            raise StoreError(
                f"the store has {len(shards)} shards, fewer than world_size {world_size}; "
                "harvest with smaller shard_rows so every rank has a shard"
            )
        per_rank = [
            sum(shards[i]["n_non_special"] for i in range(r, len(shards), world_size))
            for r in range(world_size)
        ]
        n_batches = min(per_rank) // batch_size
        mine = list(range(rank, len(shards), world_size))
        scales = {site: self.scale(site) for site in chosen} if scaled else {}
        for epoch in range(epochs):
            seed_state = np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]
            gen = torch.Generator().manual_seed(int(seed_state))
            order = [mine[i] for i in torch.randperm(len(mine), generator=gen).tolist()]
            epoch_batches = self._shuffled(chosen, order, batch_size, buffer_tokens, gen)
            for _, batch in zip(range(n_batches), epoch_batches, strict=False):
                yield {s: batch[s] / scales[s] for s in chosen} if scaled else batch

    def verify(self) -> None:
        """Check every shard of every site against its manifest (size and SHA-256); StoreError if not."""
        for site in self.sites:
            for path, entry in self._shards(site):
                _verify_shard(path, entry, full=True)

    # -- internals

    def _site(self, spec: Site | str) -> Site:
        site = spec if isinstance(spec, Site) else parse_site(spec)
        if site not in self._manifests:
            raise StoreError(
                f"site {str(site)!r} is not in store {str(self.root)!r}: it holds {', '.join(map(str, self.sites))}"
            )
        return site

    def _shards(self, site: Site) -> Iterator[tuple[Path, dict[str, Any]]]:
        folder = self.root / site.folder
        for entry in self._manifests[site]["shards"]:
            yield folder / entry["file"], entry

    def _load(self, path: Path, entry: dict[str, Any]) -> tuple[Tensor, Tensor]:
        _verify_shard(path, entry, full=False)
        try:
            tensors = load_safetensors(path.read_bytes())
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise StoreError(f"cannot read shard {str(path)!r}: {err}") from err
        return tensors["acts"], tensors["token_ids"].long()

    def _shared_shards(self, sites: list[Site]) -> list[dict[str, Any]]:
        """The shard list the sites share; they must hold the same rows, shard for shard."""
        first = self._manifests[sites[0]]["shards"]
        for site in sites[1:]:
            other = self._manifests[site]["shards"]
            same = len(other) == len(first) and all(
                a["rows"] == b["rows"] and a["token_ids_sha256"] == b["token_ids_sha256"]
                for a, b in zip(first, other, strict=True)
            )
            if not same:
                raise StoreError(
                    f"sites {sites[0]} and {site} hold different rows in {str(self.root)!r}; "
                    "harvest them together with the same n_tokens"
                )
        return list(first)

    def _shuffled(
        self, sites: list[Site], order: list[int], batch_size: int, buffer_tokens: int, gen: torch.Generator
    ) -> Iterator[dict[Site, Tensor]]:
        """Batches from the shards in `order` through a buffer that is served down to half when full.
        Shards wait in a list and are joined only when the buffer is served, so each token is copied
        about twice, not once per shard read."""
        parts: dict[Site, list[Tensor]] = {s: [] for s in sites}
        size = 0
        for position, index in enumerate(order):
            chunk = self._non_special(sites, index)
            for s in sites:
                parts[s].append(chunk[s])
            size += len(chunk[sites[0]])
            last = position == len(order) - 1
            if size < buffer_tokens and not last:
                continue
            buffer = {s: torch.cat(parts[s]) for s in sites}
            n_out = (size - (0 if last else buffer_tokens // 2)) // batch_size * batch_size
            perm = torch.randperm(size, generator=gen)
            for start in range(0, n_out, batch_size):
                take = perm[start : start + batch_size]
                yield {s: buffer[s][take] for s in sites}
            rest = perm[n_out:]
            parts = {s: [buffer[s][rest]] for s in sites}
            size = len(rest)

    def _non_special(self, sites: list[Site], index: int) -> dict[Site, Tensor]:
        """Shard `index` of each site as fp32 `[non-special tokens, d_in]`, the same positions per site."""
        out: dict[Site, Tensor] = {}
        keep: Tensor | None = None
        for site in sites:
            entry = self._manifests[site]["shards"][index]
            acts, ids = self._load(self.root / site.folder / entry["file"], entry)
            if keep is None:
                keep = ~special_mask(ids, self.special_ids).reshape(-1)
            out[site] = acts.reshape(-1, acts.shape[-1])[keep].float()
        return out
