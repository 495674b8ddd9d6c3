"""Micro-batching across devices and pipelines, one batcher per model.

The batcher takes everything queued (up to ``max_batch``) and runs it as one
inference call in the model's worker thread. While a call runs, new items
queue up, so the batch grows with the load: at low load every message is
inferred alone and at once; at high load one call serves many. A partial batch
waits at most ``max_delay_ms`` for more only while messages keep arriving.

Unless ``models.<name>.max_batch`` is set, a batch holds at most :data:`INPUT_BUDGET` input
values: ONNX Runtime keeps the activations of the largest batch it ran, so a model over long
windows (the appliance CNN's 1460 samples) at batch 64 holds far more memory than the whole
rest of the daemon, for little gain in speed (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Awaitable, Callable

import numpy as np
import numpy.typing as npt

from edge.pipeline import WorkItem
from edge.runtime import LoadedModel

log = logging.getLogger("edge.batcher")

INPUT_BUDGET = 8_192  # input values (float32) per inference call when max_batch is not configured

Sink = Callable[[list[WorkItem], npt.NDArray[np.float32] | None, float, Exception | None], None]


def batch_cap(model: LoadedModel) -> int:
    """The largest batch for ``model``: ``max_batch`` as configured, else capped by input size."""
    cfg = model.config
    if "max_batch" in cfg.model_fields_set:
        return cfg.max_batch
    per_item = max(1, math.prod(model.spec.sample_shape))
    return max(1, min(cfg.max_batch, INPUT_BUDGET // per_item))


class Batcher:
    """Queue of work for one model and the loop that feeds its worker."""

    def __init__(
        self,
        model: LoadedModel,
        sink: Sink,
        max_queue: int = 100_000,
        room: Callable[[], Awaitable[None]] | None = None,
        taken: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.sink = sink
        self.room = room  # awaited before each batch: back-pressure from the outgoing side
        self.taken = taken  # called once a batch is off the queue: room made (edge/intake.py)
        self.max_batch = batch_cap(model)
        self.max_delay = model.config.max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.queue: collections.deque[WorkItem] = collections.deque()
        self.batches = 0
        self.items = 0
        self.overflow = 0
        self.sink_errors = 0
        self._event = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        shape = (self.max_batch, *model.spec.sample_shape)
        self._buffer = np.empty(shape, dtype=np.float32)

    def put(self, item: WorkItem) -> bool:
        """Queue an item; ``False`` (and the caller counts a drop) when the queue is full."""
        if len(self.queue) >= self.max_queue:
            self.overflow += 1
            return False
        self.queue.append(item)
        self._idle.clear()
        self._event.set()
        return True

    async def run(self) -> None:
        queue = self.queue
        while True:
            if not queue:
                self._idle.set()
                self._event.clear()
                await self._event.wait()
            if 0 < len(queue) < self.max_batch and self.max_delay > 0:
                # Messages are arriving right now: give the batch a moment to fill.
                before = len(queue)
                await asyncio.sleep(0)
                if len(queue) > before:
                    deadline = time.perf_counter() + self.max_delay
                    while len(queue) < self.max_batch and time.perf_counter() < deadline:
                        grown = len(queue)
                        await asyncio.sleep(self.max_delay / 4)
                        if len(queue) == grown:
                            break
            if self.room is not None:
                await self.room()
            count = min(len(queue), self.max_batch)
            batch = [queue.popleft() for _ in range(count)]
            if self.taken is not None:
                self.taken()  # may resume the intake: inputs queue up while this batch runs
            inputs = self._buffer[:count]
            started = time.perf_counter()
            try:
                for i, item in enumerate(batch):
                    inputs[i] = item.vector
                outputs = await self.model.run(inputs)  # the buffer is not refilled until this returns
            except asyncio.CancelledError:
                queue.extendleft(reversed(batch))
                raise
            except Exception as exc:  # only this batch fails; the loop goes on
                self._hand_over(batch, None, time.perf_counter() - started, exc)
                continue
            self.batches += 1
            self.items += count
            self._hand_over(batch, outputs, time.perf_counter() - started, None)

    def _hand_over(
        self,
        batch: list[WorkItem],
        outputs: npt.NDArray[np.float32] | None,
        seconds: float,
        error: Exception | None,
    ) -> None:
        """Give a batch to the sink; a sink that raises loses that batch, never the batcher (the
        sink isolates items itself; this is the last guard that keeps the model answering)."""
        try:
            self.sink(batch, outputs, seconds, error)
        except Exception:
            self.sink_errors += 1
            log.exception("answering a batch of %d for model %r failed", len(batch), self.model.name)

    async def drained(self) -> None:
        """Wait until everything queued has been inferred and handed to the sink."""
        await self._idle.wait()
