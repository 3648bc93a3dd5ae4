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
from safetensors.torch import load as load_safetensors
from torch import Tensor

from gemmascope.activations.shards import IDENTITY, read_manifests, read_verified, verify_shard
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

    def _load(self, path: Path, entry: dict[str, Any]) -> tuple[Tensor, Tensor]:
        data = read_verified(path, entry)
        try:
            tensors = load_safetensors(data)
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
        about twice, not once per shard read; the buffer and what stays of it are two tensors per
        site reused from one fill to the next (a fresh 0.7 GB tensor a fill cost up to a second of
        page faults)."""
        parts: dict[Site, list[Tensor]] = {s: [] for s in sites}
        room: dict[str, Tensor] = {}  # "buffer SITE", "rest SITE": the reused tensors
        size = 0
        for position, index in enumerate(order):
            chunk = self._non_special(sites, index)
            for s in sites:
                parts[s].append(chunk[s])
            size += len(chunk[sites[0]])
            last = position == len(order) - 1
            if size < buffer_tokens and not last:
                continue
            buffer = {
                s: torch.cat(parts[s], out=_reused(room, f"buffer {s}", parts[s][0], size)) for s in sites
            }
            n_out = (size - (0 if last else buffer_tokens // 2)) // batch_size * batch_size
            perm = torch.randperm(size, generator=gen)
            for start in range(0, n_out, batch_size):
                take = perm[start : start + batch_size]
                yield {s: buffer[s][take] for s in sites}
            rest = perm[n_out:]
            parts = {
                s: [
                    torch.index_select(
                        buffer[s], 0, rest, out=_reused(room, f"rest {s}", buffer[s], len(rest))
                    )
                ]
                for s in sites
            }
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


def _reused(room: dict[str, Tensor], key: str, like: Tensor, rows: int) -> Tensor:
    """The first `rows` rows of `room[key]`, a tensor shaped as `like` past its first dimension,
    grown when it has fewer."""
    if key not in room or len(room[key]) < rows:
        room[key] = like.new_empty((rows, *like.shape[1:]))
    return room[key][:rows]
