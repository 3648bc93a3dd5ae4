"""The one way to the model. Owns `ModelQueue`: every request that runs the model waits in it, in
arrival order, and its work runs one at a time on the queue's own worker thread under the run's model
lock (torch hooks are per model, so two requests editing or capturing it at once would see each
other's hooks). A request that waits holds no thread, so pages and index lookups are answered
meanwhile; past the bound on waiting requests a request is told to retry (503) rather than pile up.

Knows nothing of routes or of what the work computes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from gemmascope.server.errors import ApiError

T = TypeVar("T")


class ModelQueue:
    """Model work, one request at a time, at most `max_waiting()` requests waiting or running.

    `max_waiting` is read per request, so the bound can change while serving. `waiting[0]` is the
    number of requests waiting or running (a one-element list, shared with `app.state.model_queue`).
    A thread pool rather than an event-loop primitive, so the queue works under any event loop
    (uvicorn's, or a test client's)."""

    def __init__(self, model_lock: threading.Lock, max_waiting: Callable[[], int]) -> None:
        self.model_lock = model_lock
        self.max_waiting = max_waiting
        self.waiting = [0]
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemmascope-model")

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` (model work) on the model's worker thread, once the requests before it are
        done, and return its result; ApiError 503 when too many requests are waiting already."""
        if self.waiting[0] >= self.max_waiting():
            raise ApiError(503, f"the model is busy with {self.waiting[0]} requests; try again shortly")
        self.waiting[0] += 1

        def locked() -> T:
            with self.model_lock:
                return fn()

        try:
            return await asyncio.wrap_future(self._worker.submit(locked))
        finally:
            self.waiting[0] -= 1
