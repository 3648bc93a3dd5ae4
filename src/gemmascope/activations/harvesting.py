"""Harvesting model sites into the activation store: the checks of a harvest request, the forward
passes (one per batch feeds every site), the shard writer with its manifest, and resuming a killed or
extending a finished harvest so that it writes the same bytes as one uninterrupted run. Under
torchrun each rank harvests its own shards (shard i belongs to rank i mod world) into the one store,
listing them in its own `manifest.rankR.json`; rank 0 merges those into the manifest once every rank
is done, so the store is byte for byte the one a single process writes. A killed rank resumes from
its own list.

Knows nothing of how the shards are read back or batched (`store.py`) nor of what trains on them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor
from tqdm import tqdm

from gemmascope import ranks
from gemmascope.activations.shards import STORE_FORMAT, read_manifests, tensor_sha256, verify_shard
from gemmascope.activations.store import ActivationStore
from gemmascope.corpus import DEFAULT_CORPUS, SPLITS, source_name, special_mask, token_rows
from gemmascope.errors import ConfigError, CorpusError, StoreError
from gemmascope.models import LanguageModel
from gemmascope.runs import ACTIVATIONS, MANIFEST, TMP_SUFFIX, lock, write_atomic
from gemmascope.sites import Site, capture_batches, parse_site, site_d_in

DEFAULT_SHARD_TOKENS = 2**15  # tokens per shard unless shard_rows is given: ~84 MB at d_in 640 in fp32
DEFAULT_BATCH_ROWS = 16  # rows per forward pass
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}


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
    Rows come from `corpus.token_rows`. Shards hold `shard_rows` rows
    (default: 32,768 tokens' worth), computed `batch_rows` rows per forward pass. Activations are stored
    in `dtype` (float32, float16 or bfloat16; fp32/fp16/bf16 are accepted). The forward passes run in
    the model's dtype (`models.reading_dtype`), the manifest's `model_dtype`, which a resume keeps.

    Resumable: run it again with the same arguments after a crash or kill and it verifies the shards
    already listed (size and SHA-256), recomputes from the first missing one and ends with exactly the
    rows asked for. Asking for more tokens than a finished harvest holds extends it; a folder holding
    another model's, corpus's, split's or context length's activations is refused. Holds the run
    folder's writer lock."""
    check_request(sites, n_tokens, dtype, split, context_len)
    sites = _check_sites(model, sites)
    dtype = dtype_name(dtype)
    if not 2 <= context_len <= model.max_context:
        raise ConfigError(
            f"context length {context_len} is out of range for model {model.name!r}: expected 2..{model.max_context}"
        )
    if batch_rows is not None and batch_rows < 1:
        raise ConfigError(f"batch_rows {batch_rows} must be at least 1")
    if shard_rows is not None and shard_rows < 1:
        raise ConfigError(f"shard_rows {shard_rows} must be at least 1")

    ranks = _Ranks.start()
    try:
        with lock(run_dir, "harvest"):
            store = _harvest(
                model, sites, Path(run_dir), n_tokens, corpus, context_len, dtype, shard_rows, batch_rows,
                split, progress and ranks.rank == 0, ranks,
            )  # fmt: skip
    except BaseException:
        # No barrier on the way out: the others must not take this rank's failure for its arrival.
        # They stay at their next barrier until torchrun, seeing this rank fail, stops them all.
        ranks.abandon()
        raise
    ranks.finish()
    return store


class _Ranks:
    """This process's part of a torchrun harvest: `rank` of `world` (0 of 1 without torchrun), and
    the barrier the ranks meet at (gloo: only barriers cross processes)."""

    def __init__(self, rank: int, world: int, owns_group: bool) -> None:
        self.rank, self.world, self.owns_group = rank, world, owns_group

    @classmethod
    def start(cls) -> _Ranks:
        import os

        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), False)
        if world <= 1:
            return cls(0, 1, False)
        ranks.join("gloo")
        return cls(dist.get_rank(), world, True)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def abandon(self) -> None:
        """Leave the group at once, meeting no one (this rank failed)."""
        if self.owns_group:
            ranks.leave(together=False)
            self.owns_group = False

    def finish(self) -> None:
        if self.owns_group:
            ranks.leave()  # together: a rank leaving early can abort the others at exit
            self.owns_group = False


def check_request(
    sites: Sequence[Site | str], n_tokens: int, dtype: str, split: str = "train", context_len: int = 128
) -> None:
    """The checks of a harvest that need no model (site names, token count, dtype, split, context
    length), so a command can refuse bad arguments before it spends seconds loading the model."""
    if not sites:
        raise ConfigError("harvest needs at least one site, e.g. 'resid_post.6'")
    for spec in sites:
        parse_site(spec)
    dtype_name(dtype)
    if n_tokens < 1:
        raise ConfigError(f"n_tokens {n_tokens} must be at least 1")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    if context_len < 2:
        raise ConfigError(f"context length {context_len} is out of range: expected at least 2")


def _harvest(
    model: LanguageModel,
    sites: list[Site],
    run_dir: Path,
    n_tokens: int,
    corpus: str,
    context_len: int,
    dtype: str,
    shard_rows: int | None,
    batch_rows: int | None,
    split: str,
    progress: bool,
    ranks: _Ranks,
) -> ActivationStore:
    """The harvest proper, under the run folder's lock (see `harvest`)."""
    root = run_dir / ACTIVATIONS
    existing = read_manifests(root)
    identity = _identity(model, existing, run_dir, corpus, split, context_len, shard_rows)
    n_rows = math.ceil(n_tokens / context_len)
    shard_ranges = [
        (a, min(a + identity["shard_rows"], n_rows)) for a in range(0, n_rows, identity["shard_rows"])
    ]
    rows = token_rows(model.tokenizer, n_tokens, corpus, split, context_len, exact=False)
    if len(rows) < n_rows:
        raise CorpusError(
            f"corpus {corpus!r} (split {split!r}) gives {len(rows)} rows of {context_len} tokens "
            f"({len(rows) * context_len} tokens), fewer than the {n_tokens} tokens asked for"
        )
    special_ids = model.special_token_ids
    is_special = special_mask(rows, special_ids)

    ours = {site: existing[site] for site in sites if site in existing}
    batch_rows = _agreed(ours, "batch_rows", batch_rows, DEFAULT_BATCH_ROWS)
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
            "dtype": dtype,
            "model_dtype": model.dtype_name,  # the forward passes' dtype
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
    if ranks.rank == 0:
        for writer in writers.values():  # only once every site has passed its checks
            writer.start()
    ranks.barrier()  # no rank writes a shard before rank 0 has cleared what a killed harvest left
    mine = [i for i in range(len(shard_ranges)) if i % ranks.world == ranks.rank]
    if ranks.world > 1:
        for writer in writers.values():
            writer.adopt_rank_lists(ranks.rank, mine, rows)
    _harvest_shards(model, rows, is_special, writers, shard_ranges, mine, batch_rows, DTYPES[dtype], progress)
    ranks.barrier()
    if ranks.rank == 0:
        for writer in writers.values():
            writer.merge_rank_lists()  # one process: only drops the lists a killed torchrun left
    ranks.barrier()
    return ActivationStore(run_dir)


def _identity(
    model: LanguageModel,
    existing: dict[Site, dict[str, Any]],
    run_dir: Path,
    corpus: str,
    split: str,
    context_len: int,
    shard_rows: int | None,
) -> dict[str, Any]:
    """What every site of the store shares (model, corpus, split, context length, shard size),
    checked against the sites already harvested: a StoreError names the first that differs."""
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
    return identity


def _harvest_shards(
    model: LanguageModel,
    rows: Tensor,
    is_special: Tensor,
    writers: dict[Site, _SiteWriter],
    shard_ranges: list[tuple[int, int]],
    mine: list[int],
    batch_rows: int,
    dtype: torch.dtype,
    progress: bool,
) -> None:
    """Compute and write every shard of `mine` not yet complete for some site: `rows [n_rows, ctx]`
    in forward passes of `batch_rows` rows, each capturing all the sites that still need that shard."""
    context_len = rows.shape[1]
    todo_shards = [i for i in mine if any(not w.has(i) for w in writers.values())]
    size = {i: (shard_ranges[i][1] - shard_ranges[i][0]) * context_len for i in mine}
    bar = tqdm(
        total=sum(size.values()),
        initial=sum(size.values()) - sum(size[i] for i in todo_shards),
        unit="tok",
        unit_scale=True,
        desc=f"harvest {', '.join(map(str, writers))}",
        disable=not progress,
    )
    # One background thread serialises, hashes and writes shard i while the model computes shard i+1;
    # waiting for shard i-1's writes before queueing shard i bounds memory to two shards per site.
    with bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as pool:
        pending: list[Future[None]] = []
        for index in todo_shards:
            todo = [site for site in writers if not writers[site].has(index)]
            start, stop = shard_ranges[index]
            acts = {  # (rows, ctx, d_in) per site
                site: torch.empty((stop - start, context_len, writers[site].manifest["d_in"]), dtype=dtype)
                for site in todo
            }
            sum_sq = dict.fromkeys(todo, 0.0)
            for batch in capture_batches(model, rows, todo, batch_rows, start=start, stop=stop):
                a, b, captured = batch.start, batch.stop, batch.acts
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
    checked: list[Site] = []
    for spec in sites:
        site = parse_site(spec, model.n_layers)
        if site not in checked:
            checked.append(site)
    return checked


def dtype_name(dtype: str) -> str:
    """The store's name of a dtype (float32, float16, bfloat16; fp32, fp16, bf16 accepted)."""
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
        self.folder, self.manifest, self.shard_ranges = folder, manifest, shard_ranges
        self.rank: int | None = None  # under torchrun: shards go to this rank's list, not the manifest
        self.rank_entries: dict[int, dict[str, Any]] = {}

    @property
    def n_done(self) -> int:
        return len(self.manifest["shards"])

    def has(self, index: int) -> bool:
        """Whether shard `index` is complete (in the manifest or, under torchrun, this rank's list)."""
        return index < self.n_done or index in self.rank_entries

    def _rank_list(self, rank: int) -> Path:
        return self.folder / f"manifest.rank{rank}.json"

    def adopt_rank_lists(self, rank: int, mine: list[int], rows: Tensor) -> None:
        """Under torchrun: list this rank's shards here from now on, starting with those of `mine`
        that a killed harvest's rank lists (of any world size) hold, verified."""
        self.rank = rank
        for path in sorted(self.folder.glob("manifest.rank*.json")):
            try:
                entries = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # a list being replaced by a killed rank: its shards are recomputed
            for entry in entries:
                index = int(entry["index"])
                if index in mine and not self.has(index) and self._verified(index, entry, rows):
                    self.rank_entries[index] = entry
        write_atomic(
            self._rank_list(rank), json.dumps(sorted(self.rank_entries.values(), key=lambda e: e["index"]))
        )

    def _verified(self, index: int, entry: dict[str, Any], rows: Tensor) -> bool:
        if index >= len(self.shard_ranges) or tuple(entry["rows"]) != self.shard_ranges[index]:
            return False
        if not (self.folder / entry["file"]).exists():
            return False
        verify_shard(self.folder / entry["file"], entry, full=True)  # damaged: an error naming it
        start, stop = self.shard_ranges[index]
        return bool(entry["token_ids_sha256"] == tensor_sha256(rows[start:stop].to(torch.int32)))

    def merge_rank_lists(self) -> None:
        """Rank 0, once every rank is done: the manifest lists every shard of every rank's list (of
        this plan's shards), in order, and the rank lists go."""
        found = {i: e for i, e in enumerate(self.manifest["shards"])}
        lists = sorted(self.folder.glob("manifest.rank*.json"))
        for path in lists if self.rank is not None else []:  # one process lists its shards itself
            try:
                entries = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            for entry in entries:
                index = int(entry["index"])
                # a list of another plan (a killed run of other shard sizes) names other rows: skip it
                if index < len(self.shard_ranges) and tuple(entry["rows"]) == self.shard_ranges[index]:
                    found.setdefault(index, entry)
        missing = [i for i in range(len(self.shard_ranges)) if i not in found]
        if missing:
            raise StoreError(
                f"{self.manifest['site']}: shards {missing[:8]} of {str(self.folder)!r} were not written by any "
                "rank; run the same harvest again to finish them"
            )
        self.manifest["shards"] = [{k: v for k, v in found[i].items() if k != "index"} for i in sorted(found)]
        self._write_manifest()
        for path in lists:
            path.unlink()

    def keep_verified(self, old: dict[str, Any] | None, rows: Tensor) -> None:
        """Keep the old manifest's shards that match this harvest's plan, after verifying them against
        their manifest entries and the expected `rows`; the rest will be recomputed. A store of another
        dtype, or new shards beside kept ones of another model dtype, are refused. Writes nothing."""
        site, new = self.manifest["site"], self.manifest
        if old is not None and old["dtype"] != new["dtype"]:
            raise StoreError(
                f"{site} in {str(self.folder.parent.parent)!r} is stored as {old['dtype']}, not "
                f"{new['dtype']}; use another run folder"
            )
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
                if not (self.folder / entry["file"]).exists():
                    break  # deleted (as the damaged-shard error advises): recompute it and what follows
                verify_shard(self.folder / entry["file"], entry, full=True)  # damaged: an error naming it
                start, stop = self.shard_ranges[index]
                if entry["token_ids_sha256"] != tensor_sha256(rows[start:stop].to(torch.int32)):
                    raise StoreError(
                        f"shard {str(self.folder / entry['file'])!r} holds other tokens than corpus "
                        f"{self.manifest['corpus']!r} gives now; the corpus changed, use another run folder"
                    )
                self.manifest["shards"].append(entry)
        was = "float32" if old is None else old.get("model_dtype", "float32")  # before it was recorded
        if self.manifest["shards"] and was != new["model_dtype"]:
            if len(self.manifest["shards"]) < len(self.shard_ranges):  # new shards beside the kept
                raise StoreError(
                    f"{site} in {str(self.folder.parent.parent)!r} was harvested with the model in {was}, "
                    f"not {new['model_dtype']}; harvest with --model-dtype {was} or use another run folder"
                )
            new["model_dtype"] = was  # complete: nothing is written, the store stays as it was

    def start(self) -> None:
        """Clear temporary files a killed harvest left and write the manifest of the shards kept."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for tmp in self.folder.glob(f"*{TMP_SUFFIX}"):
            tmp.unlink()
        self._write_manifest()

    def write_shard(self, index: int, acts: Tensor, token_ids: Tensor, sum_sq: float, n_real: int) -> None:
        """Write shard `index` (`acts [rows, ctx, d_in]`, `token_ids [rows, ctx]`) and list it: in the
        manifest (in order), or under torchrun in this rank's list."""
        name = f"shard-{index:05d}.safetensors"
        ids32 = token_ids.to(torch.int32).contiguous()
        data = save_safetensors({"acts": acts.contiguous(), "token_ids": ids32})
        write_atomic(self.folder / name, data)
        entry = {
            "file": name,
            "rows": list(self.shard_ranges[index]),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "token_ids_sha256": tensor_sha256(ids32),
            "sum_sq": sum_sq,
            "n_non_special": n_real,
        }
        if self.rank is not None:
            self.rank_entries[index] = {**entry, "index": index}
            entries = sorted(self.rank_entries.values(), key=lambda e: e["index"])
            write_atomic(self._rank_list(self.rank), json.dumps(entries))
            return
        assert index == self.n_done, "shards are written in order"
        self.manifest["shards"].append(entry)
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
        write_atomic(self.folder / MANIFEST, json.dumps(m, indent=1) + "\n")
