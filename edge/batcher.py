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

from edge.explain import ExplainError, ExplainPlan, explain_batch, plan
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
        self.explained = 0  # answers given an attribution (output.explain)
        self.explain_rows = 0  # occluded rows inferred for them: the extra cost
        self.explain_failed = 0
        self._plans: dict[int, ExplainPlan | None] = {}  # per pipeline config, for the model's own spec
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
            for item in batch:  # attributions only where a pipeline asks for them (output.explain)
                if getattr(item.pipeline, "explain_plan", None) is not None:
                    try:
                        await self._explain(batch, inputs, outputs)
                    except asyncio.CancelledError:  # inferred already: answered, without attributions
                        self._hand_over(batch, outputs, time.perf_counter() - started, None)
                        raise
                    break
            self._hand_over(batch, outputs, time.perf_counter() - started, None)

    def _plan(self, item: WorkItem) -> ExplainPlan | None:
        """The item's pipeline's occlusion plan for this model (a queued item of a reloaded
        pipeline may meet the model that is retiring: its plan is rebuilt for that model's spec)."""
        own: ExplainPlan | None = getattr(item.pipeline, "explain_plan", None)
        if own is None or own.spec is self.model.spec:
            return own
        key = id(own.config)
        if key not in self._plans:
            try:
                self._plans[key] = plan(
                    self.model.spec, own.config, f"pipelines.{item.pipeline.name}.output.explain"
                )
            except ExplainError:
                self._plans[key] = None
        return self._plans[key]

    async def _explain(
        self, batch: list[WorkItem], inputs: npt.NDArray[np.float32], outputs: npt.NDArray[np.float32]
    ) -> None:
        """Attributions for the batch's items whose pipeline asks for them: one more call in the
        model's worker thread (all their occluded rows together, chunked at ``max_batch``), never
        on the loop. A failure costs the attributions of this batch, never its answers."""
        jobs = []
        wanted = []
        for i, item in enumerate(batch):
            p = self._plan(item)
            if p is not None:
                jobs.append((p, inputs[i].copy(), outputs[i]))
                wanted.append(item)
        if not jobs:
            return
        try:
            results = await self.model.call(explain_batch, self.model.run_sync, jobs, self.max_batch)
        except Exception:
            self.explain_failed += len(jobs)
            if self.explain_failed == len(jobs) or self.explain_failed % 1000 < len(jobs):
                log.exception("explaining %d answers of model %r failed", len(jobs), self.model.name)
            return
        for item, result in zip(wanted, results, strict=True):
            item.explain = result
        self.explained += len(jobs)
        self.explain_rows += sum(p.rows for p, _, _ in jobs)

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
