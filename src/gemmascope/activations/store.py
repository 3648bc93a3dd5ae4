"""Reading the activation store back: `ActivationStore` opens a run folder's manifests, checks that
its sites form one store, and serves a site's rows in order, every row's token ids, the scale C, and
shuffled batches of non-special tokens (data-parallel by shard); every shard it reads is verified
against its manifest first.

Knows nothing of models or of how the shards were harvested, nor of what trains on the batches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from gemmascope.activations.shards import IDENTITY, read_manifests, read_verified, shard_tensors, verify_shard
from gemmascope.corpus import special_mask
from gemmascope.errors import ConfigError, StoreError
from gemmascope.runs import ACTIVATIONS
from gemmascope.sites import Site, parse_site


class ActivationStore:
    """A harvested activation store, `run_dir/activations`. Opening it reads only the manifests.

    Every site of a store shares the model, corpus, split, context length and shard layout; sites
    harvested together hold the same rows, so `batches` can serve several sites at the same tokens."""

    def __init__(self, run_dir: Path | str, allow_incomplete: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / ACTIVATIONS
        if not self.root.is_dir():
            raise StoreError(f"no activation store at {str(self.root)!r}: run `gemmascope harvest` first")
        self._manifests = read_manifests(self.root)
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
            for key in IDENTITY:
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
            verify_shard(path, entry, full=False)
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
        buffer and, once it holds `buffer_tokens`, serves random batches until half remains. Memory: per
        site two buffers of `buffer_tokens` plus the largest shard's tokens, and one shard's bytes. The
        order depends only on (seed, epoch, rank).

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
                verify_shard(path, entry, full=True)

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

    def _load(
        self, path: Path, entry: dict[str, Any], scratch: bytearray | None = None
    ) -> tuple[Tensor, Tensor]:
        """A shard's `(acts [rows, ctx, d_in], token_ids [rows, ctx] int64)`, acts in the shard's dtype
        and, with `scratch`, a view into it (`read_verified`)."""
        tensors = shard_tensors(path, read_verified(path, entry, scratch))
        if "acts" not in tensors or "token_ids" not in tensors:
            raise StoreError(
                f"cannot read shard {str(path)!r}: it lacks acts or token_ids; run harvest again"
            )
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
        """Batches from the shards in `order` through a buffer that is served down to half when full:
        each shard's non-special tokens are gathered straight into the buffer behind what stayed of
        the last fill, which is moved to the front of a second buffer, the two swapped each fill
        (both reused: a fresh 0.7 GB tensor a fill cost up to a second of page faults; each token is
        copied from the shard once, and once each time it stays)."""
        room: dict[str, Tensor] = {}  # "fill SITE", "next SITE": the two buffers
        # each site's shard bytes, room for its largest shard from the start (never grown under a view)
        scratch = {s: bytearray(max(int(e["bytes"]) for e in self._manifests[s]["shards"])) for s in sites}
        shards = self._manifests[sites[0]]["shards"]
        rows = buffer_tokens + max(int(shards[i]["n_non_special"]) for i in order)  # room for a fill
        d_in = {s: int(self._manifests[s]["d_in"]) for s in sites}
        size = 0
        for position, index in enumerate(order):
            need = size + int(shards[index]["n_non_special"])
            buffer = {s: _reused(room, f"fill {s}", max(rows, need), d_in[s], keep=size) for s in sites}
            size += self._non_special(sites, index, {s: buffer[s][size:] for s in sites}, scratch)
            last = position == len(order) - 1
            if size < buffer_tokens and not last:
                continue
            n_out = (size - (0 if last else buffer_tokens // 2)) // batch_size * batch_size
            perm = torch.randperm(size, generator=gen)
            for start in range(0, n_out, batch_size):
                take = perm[start : start + batch_size]
                yield {s: buffer[s][take] for s in sites}
            rest = perm[n_out:]
            for s in sites:  # what stays goes to the front of the other buffer, which fills next
                after = _reused(room, f"next {s}", max(rows, len(rest)), d_in[s])
                torch.index_select(buffer[s][:size], 0, rest, out=after[: len(rest)])
                room[f"fill {s}"], room[f"next {s}"] = after, room[f"fill {s}"]
            size = len(rest)

    def _non_special(
        self, sites: list[Site], index: int, into: dict[Site, Tensor], scratch: dict[Site, bytearray]
    ) -> int:
        """Shard `index`'s non-special tokens of each site, as fp32, written to the first rows of
        `into[site] [rows, d_in]` (the same positions for every site); returns how many."""
        keep: Tensor | None = None
        for site in sites:
            entry = self._manifests[site]["shards"][index]
            acts, ids = self._load(self.root / site.folder / entry["file"], entry, scratch[site])
            if keep is None:
                keep = torch.nonzero(~special_mask(ids, self.special_ids).reshape(-1)).squeeze(1)
            flat, out = acts.reshape(-1, acts.shape[-1]), into[site][: len(keep)]
            if flat.dtype == out.dtype:
                torch.index_select(flat, 0, keep, out=out)
            else:  # a bfloat16 store
                out.copy_(flat.index_select(0, keep))
        return 0 if keep is None else len(keep)


def _reused(room: dict[str, Tensor], key: str, rows: int, d_in: int, keep: int = 0) -> Tensor:
    """`room[key]`, a float32 `[at least rows, d_in]` tensor reused from call to call, made or grown
    (its first `keep` rows kept) when it has fewer rows."""
    if key not in room or len(room[key]) < rows:
        grown = torch.empty(rows, d_in)
        if keep:
            grown[:keep] = room[key][:keep]
        room[key] = grown
    return room[key]
