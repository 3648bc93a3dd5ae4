"""Training in several processes that `torchrun` started (ARCHITECTURE.md, Scale): joining the process
group, this rank's device and share of the run, and the collectives that make a data-parallel step
equal to the single-process step. Two modes (`PARALLEL_MODES`): `data` (the ranks split each batch)
and `sae` (the ranks split the SAEs, balanced by d_in x width). An architecture whose step needs the
whole batch (`Architecture.data_parallel` False: BatchTopK) cannot be split by data.

Knows nothing of the recipe's numbers, of checkpoints or of files beyond the store's manifests; in
one process every method is a pass-through.
"""

from __future__ import annotations

import atexit
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gemmascope import ranks
from gemmascope.activations import ActivationStore
from gemmascope.errors import ConfigError
from gemmascope.sae import SAE, architecture
from gemmascope.sites import Site, parse_site
from gemmascope.train.config import PARALLEL_MODES, TrainConfig, TrainSpec


class Parallel:
    """This process's share of a training run that `torchrun` started in several processes (on one
    machine or several), through torch.distributed: gloo for training on CPU, NCCL on CUDA.

    `data`: every rank holds every SAE and reads its own slice of the store (its shards, see
    `ActivationStore.batches`) at `batch_size / world_size` tokens a step. Loss values, gradients
    and the logged counts are averaged or summed over the ranks, so each step is the single-process
    step on the ranks' batches concatenated in rank order (equal within fp32 rounding). Rank 0 writes
    the log, checkpoints and SAEs; every rank reads the run folder (one filesystem all nodes see).
    `sae`: the SAEs are spread over the ranks, balanced by d_in x width; each rank reads the whole
    stream exactly as one process would, trains its SAEs with its own checkpoint and log (`NAME` +
    `.rankRofW`) and saves them; the only collective is the final exchange of folders.
    One process (no torchrun, or a world of 1): nothing is shared and nothing changes."""

    def __init__(self, mode: str, rank: int, world: int, device: torch.device) -> None:
        self.mode, self.rank, self.world, self.device = mode, rank, world, device
        self.data = mode == "data" and world > 1  # ranks split each batch
        self.spread = mode == "sae" and world > 1  # ranks split the SAEs
        self.mine: list[int] = []
        self.owns_group = False  # whether `start` joined the process group (and `finish` leaves it)

    @classmethod
    def start(cls, cfg: TrainConfig, specs: list[TrainSpec], store: ActivationStore) -> Parallel:
        """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR...) unless the
        caller already did, and check that the run can be shared in `cfg.parallel` mode."""
        import torch.distributed as dist

        if cfg.parallel not in PARALLEL_MODES:
            raise ConfigError(f"unknown parallel mode {cfg.parallel!r}: expected one of {PARALLEL_MODES}")
        device = _training_device(cfg.device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        started = dist.is_available() and dist.is_initialized()
        if started:
            world = dist.get_world_size()
        elif world > 1:
            if not dist.is_available():
                raise ConfigError(f"WORLD_SIZE is {world} but this PyTorch has no torch.distributed")
            ranks.join("nccl" if device.type == "cuda" else "gloo")
            atexit.register(ranks.leave, together=False)  # if the run fails before `finish`
        par = cls(cfg.parallel, dist.get_rank() if world > 1 else 0, world, device)
        par.owns_group = world > 1 and not started
        if par.data:
            if cfg.batch_size % world:
                raise ConfigError(
                    f"data-parallel training splits each batch over {world} processes: batch size "
                    f"{cfg.batch_size} must be a multiple of {world}"
                )
            whole = [s for s in specs if not architecture(s.architecture).data_parallel]
            if whole:
                raise ConfigError(
                    f"{whole[0].architecture} ranks the whole batch, which data-parallel training splits "
                    f"({whole[0].name}); train it with parallel='sae' or in one process"
                )
        parts = _spread(specs, store, world) if par.spread else [list(range(len(specs)))]
        if any(not part for part in parts):
            raise ConfigError(
                f"SAE-parallel training of {len(specs)} SAEs over {world} processes leaves some idle"
            )
        par.mine = parts[par.rank if par.spread else 0]
        return par

    @property
    def writes(self) -> bool:
        """Whether this process writes checkpoints, logs and SAEs (data-parallel: rank 0 only)."""
        return not self.data or self.rank == 0

    @property
    def suffix(self) -> str:
        """What tells this rank's checkpoint and log apart in SAE-parallel mode."""
        return f".rank{self.rank}of{self.world}" if self.spread else ""

    def key(self, key: str) -> str:
        """The run key with how the run is shared: a resumed run must be shared the same way."""
        if self.world == 1:
            return key
        return json.dumps(
            {**json.loads(key), "parallel": self.mode, "world_size": self.world}, sort_keys=True
        )

    def batches(
        self, store: ActivationStore, sites: list[Site], cfg: TrainConfig, epochs: int, steps: int
    ) -> Iterator[dict[Site, Tensor]]:
        """This rank's batches. Data-parallel ranks read only their own shards, so an epoch gives as
        many batches as the smallest slice allows: allow up to one epoch per step (the reader is
        lazy; the planned steps still end the run)."""
        return store.batches(
            sites,
            cfg.batch_size // self.world if self.data else cfg.batch_size,
            seed=cfg.seed,
            buffer_tokens=cfg.buffer_tokens,
            epochs=max(epochs, steps) if self.data else epochs,
            rank=self.rank if self.data else 0,
            world_size=self.world if self.data else 1,
            scaled=True,
        )

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor)  # sum
        return tensor

    def shared_mean(self, value: Tensor) -> Tensor:
        """`value` with the mean over ranks as its value and this rank's gradient (averaged later
        with the others' by `reduce_grads`, which makes it the gradient of the mean); one process:
        `value`."""
        if not self.data:
            return value
        mean = self._all_reduce(value.detach().clone()) / self.world
        return value + (mean - value).detach()

    def share_out(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """A step's loss (value of the whole batch, gradient of this rank's part), recon, l0 and
        fired (per-latent counts) over the whole batch."""
        if not self.data:
            return out
        fired = self._all_reduce(out["fired"].clone())  # per-latent counts, summed over the ranks
        return {
            "loss": self.shared_mean(out["loss"]),
            "recon": self.shared_mean(out["recon"]).detach(),
            "l0": self.shared_mean(out["l0"].float()).detach(),
            "fired": fired,
        }

    def gather(self, x: Tensor) -> Tensor:
        """Data-parallel: the whole step's batch, every rank's part of `x [batch, d_in]` in rank order
        (what one process would have read); otherwise `x`."""
        if not self.data:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world)]  # every rank's part has the same size
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def reduce_grads(self, sae: SAE) -> None:
        """Average every parameter's gradient over the ranks (before the decoder projection and Adam)."""
        for p in sae.parameters():
            if not p.requires_grad:  # a parameter the optimiser keeps fixed (the same on every rank)
                continue
            if p.grad is None:  # every rank must take part in every all-reduce
                p.grad = torch.zeros_like(p)
            # the same memory seen in the order it is laid out (a latent-major encoder's gradient
            # is a transpose): NCCL all-reduces contiguous tensors only
            strides = p.grad.stride()
            grad = p.grad.permute(sorted(range(p.grad.dim()), key=lambda d: -strides[d]))
            if grad.is_contiguous():
                self._all_reduce(grad).div_(self.world)
            else:  # not a permutation of a contiguous tensor: reduce a copy
                p.grad.copy_(self._all_reduce(p.grad.contiguous()).div_(self.world))

    def tokens(self, local: int) -> int:
        """Tokens in the whole step's batch: summed over the ranks, since the massive-activation filter
        keeps a different number on each, so that every rank counts alike (dead latents, densities)."""
        if not self.data:
            return local
        return int(self._all_reduce(torch.tensor([local], dtype=torch.float64, device=self.device)).item())

    def sq_dev(self, x: Tensor) -> float:
        """Σ ‖x − mean(x)‖² over the whole step's batch `x [batch, d_in]`."""
        if not self.data:
            return float((x - x.mean(0)).pow(2).sum())
        x64 = x.double()
        count = torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)
        sums = self._all_reduce(torch.cat([x64.sum(0), x64.pow(2).sum().view(1), count]))
        n = float(sums[-1])
        return float(sums[-2] - sums[:-2].pow(2).sum() / n)

    def sum(self, tensor: Tensor) -> Tensor:
        """`tensor` summed over the ranks that split the batch."""
        return self._all_reduce(tensor.float()) if self.data else tensor

    def finish(self, outputs: list[Path], n_specs: int) -> list[Path]:
        """Every SAE folder of the run, in the order of the specs, on every rank; then leave the
        process group if `start` joined it."""
        if self.world == 1:
            return outputs
        import torch.distributed as dist

        if self.data:
            shared: list[Any] = [outputs]
            dist.broadcast_object_list(shared, src=0)
            folders = [Path(p) for p in shared[0]]
        else:
            parts: list[Any] = [None] * self.world
            dist.all_gather_object(parts, (self.mine, [str(p) for p in outputs]))
            by_spec: list[Path | None] = [None] * n_specs
            for indices, paths in parts:
                for i, p in zip(indices, paths, strict=True):
                    by_spec[i] = Path(p)
            folders = [p for p in by_spec if p is not None]
        if self.owns_group:
            atexit.unregister(ranks.leave)
            ranks.leave()  # together, and destroyed for good (see `gemmascope.ranks`)
            self.owns_group = False
        return folders


def _spread(specs: list[TrainSpec], store: ActivationStore, world: int) -> list[list[int]]:
    """Spec indices per rank, balancing d_in x width (the cost of a step), largest first."""
    cost = [int(store.manifest(parse_site(s.site))["d_in"]) * s.width for s in specs]
    loads, parts = [0] * world, [[] for _ in range(world)]  # type: list[int], list[list[int]]
    for i in sorted(range(len(specs)), key=lambda i: (-cost[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        parts[rank].append(i)
        loads[rank] += cost[i]
    return [sorted(part) for part in parts]


def _training_device(name: str) -> torch.device:
    """The device SAEs train on; plain "cuda" under torchrun is this process's GPU (LOCAL_RANK)."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {name!r}: expected cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device
