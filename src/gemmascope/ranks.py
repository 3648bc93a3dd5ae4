"""The process group of a `torchrun` job (ARCHITECTURE.md, Scale): joining it and leaving it, the one
way a harvest's ranks (`activations.harvesting`) and training's (`train.distributed`) do.

Leaving must really destroy the group. A gloo group whose Python object outlives
`destroy_process_group` keeps its threads and sockets until the interpreter frees it at exit, in no
set order with the other ranks: that is how a rank died of SIGABRT at exit ("terminate called
without an active exception") in tests/test_distributed.py. What kept it alive:
`torch.distributed.nn.functional` binds the default group as a default argument of its functions
(`group=group.WORLD`) when it is first imported, and torch imports it lazily (a process's first
`torch.optim` optimizer imports `torch._dynamo`, which imports it). `join` imports it before the
group exists, so it binds None; `leave` warns if the group still outlives it.

Knows nothing of what the ranks do.
"""

from __future__ import annotations

import gc
import warnings
import weakref


def join(backend: str) -> None:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT) with
    `backend` ("gloo" on CPU, "nccl" on CUDA)."""
    import torch.distributed as dist
    import torch.distributed.nn.functional  # noqa: F401  before the group: see the module docstring

    dist.init_process_group(backend)


def leave(together: bool = True) -> None:
    """Leave the process group and destroy it. `together`: after a barrier, so no rank tears its
    group down while another still talks to it; False: at once, meeting no one (a rank that failed,
    whose partners stay at their next collective until torchrun stops them all)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if together:
        dist.barrier()
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    if group() is not None:
        gc.collect()
    if group() is not None:
        warnings.warn(
            "the torch.distributed process group outlives destroy_process_group (something still "
            "holds it): its threads stay until this process exits",
            RuntimeWarning,
            stacklevel=2,
        )
