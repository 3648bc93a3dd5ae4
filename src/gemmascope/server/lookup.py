"""What a request brings and names, looked up in the served run. Owns `Body`, the base of every
request body (each route's own body lives beside the route), `Number` (a real number a body brings), the route dependencies that hand a route
the app's `Run` and `ModelQueue`, and finding an SAE by id and a feature by index, with the 4xx a bad
name gets. Never a path: SAEs are looked up by id in the run's table.

Knows nothing of the routes that use them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from pydantic import AfterValidator, BaseModel, ConfigDict

from gemmascope.server.errors import ApiError
from gemmascope.server.model_queue import ModelQueue
from gemmascope.server.run import LoadedSAE, Run
from gemmascope.values import finite32


class Body(BaseModel):
    """A request body: unknown fields are refused (422), so a misspelt option is not silently ignored."""

    model_config = ConfigDict(extra="forbid")


def _finite32(value: float) -> float:
    return finite32(value, "value")


# A real number a request brings (a strength, a value): finite and within float32 (else 422), as
# the CLI's `options.number` and the library's `values.finite32` take it.
Number = Annotated[float, AfterValidator(_finite32)]


async def _run(request: Request) -> Run:
    run: Run = request.app.state.run
    return run


async def _queue(request: Request) -> ModelQueue:
    queue: ModelQueue = request.app.state.queue
    return queue


RunDep = Annotated[Run, Depends(_run)]  # the run folder the app serves
QueueDep = Annotated[ModelQueue, Depends(_queue)]  # the one way to the model


def sae_or_404(run: Run, key: str) -> LoadedSAE:
    """The run's SAE with this id (404 naming the ones it has)."""
    if key not in run.saes:
        known = ", ".join(list(run.saes)[:12]) or "no SAEs (a cross-layer transcoder only: graphs)"
        raise ApiError(404, f"unknown SAE {key!r}: this run has {known}")
    return run.saes[key]


def feature_or_4xx(entry: LoadedSAE, index: str | int) -> int:
    """`index` as a latent of this SAE: 400 when not an integer, 404 when out of range."""
    try:
        i = int(index)
    except ValueError:
        raise ApiError(
            400, f"feature index {index!r} is not an integer: expected 0..{entry.d_sae - 1}"
        ) from None
    if not 0 <= i < entry.d_sae:
        raise ApiError(
            404, f"feature index {i} is out of range for SAE {entry.id!r}: expected 0..{entry.d_sae - 1}"
        )
    return i
