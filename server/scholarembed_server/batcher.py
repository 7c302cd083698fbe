"""One queue for every caller, one worker that forms token-budget batches for the engine.

Contract: `Batcher.embed(rows)` returns one unit vector per token row, in order, exactly as
`EmbeddingEngine.forward` would for that row alone (batching and padding never change a vector).

- Requests from every unary call and stream meet in one queue of `_Item`s.
- The worker takes everything queued as one round, sorts it by length and splits it into batches of
  at most `max_batch_tokens` padded tokens (rows x longest row); a round finishes before the next is
  taken, so long texts cannot starve.
- When the queue is nearly empty the worker waits up to `max_wait_s` for company, so single queries
  stay fast and bursts still batch well.
- The queue is bounded in tokens. `embed(..., wait=False)` (unary calls) raises QueueFullError when
  it is full; `wait=True` (streams) waits for room, which stalls the stream and so pushes back on the
  client through HTTP/2 flow control.
- A cancelled caller's items leave the queue at once and are skipped if already in a round; nothing
  is computed for them.
- A forward pass that runs out of accelerator memory is split in halves and retried, down to one row;
  only a row that cannot fit alone fails.
- The forward pass runs in its own thread, so the event loop keeps accepting and tokenizing
  (tokenization runs in other threads) while the model works: the stages overlap.
- With length buckets on (`EmbeddingEngine.with_buckets`), batches are planned by bucket and launched
  without waiting for the previous one: up to `max_in_flight` batches are queued on the GPU while
  the model thread pads and uploads the next, and a fetch thread waits for each batch's vectors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .engine import EmbeddingEngine
from .errors import InputTooLargeError, QueueFullError, UnavailableError
from .metrics import Metrics
from .model.runner import PendingVectors

log = logging.getLogger(__name__)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError saying the same: the CPU allocator's ("can't allocate
    memory") is a plain RuntimeError, and so are some kernels' own out-of-memory failures."""
    import torch

    message = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)
    )


def free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(eq=False)
class _Item:
    """One token row waiting for its vector."""

    ids: Sequence[int]
    future: asyncio.Future[np.ndarray]
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        return len(self.ids)


class Batcher:
    def __init__(
        self,
        engine: EmbeddingEngine,
        *,
        max_batch_tokens: int,
        max_queue_tokens: int,
        max_wait_s: float = 0.002,
        metrics: Metrics | None = None,
        max_in_flight: int = 2,
    ) -> None:
        self._engine = engine
        self._max_batch_tokens = max_batch_tokens
        self._max_queue_tokens = max_queue_tokens
        self._max_wait_s = max_wait_s
        self._metrics = metrics
        self._pending: list[_Item] = []
        self._queued_tokens = 0  # pending plus in-flight rows: what backpressure counts
        self._room_freed = asyncio.Event()
        self._work = asyncio.Event()
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._fetch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetch")
        self._launch_slots = asyncio.Semaphore(max_in_flight)  # batches launched whose vectors are not back
        self._finishing: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._stop_compiling = threading.Event()

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def warmup(self, *, compile: bool = True) -> None:
        """Warm the engine up (compiling its bucket lengths, if any, unless not `compile`) in the thread that
        will run the model."""
        await asyncio.get_running_loop().run_in_executor(
            self._model_thread, lambda: self._engine.runner.warmup(compile=compile)
        )

    def compile_in_background(self) -> threading.Thread:
        """Compile the engine's bucket lengths in a thread of their own while the model thread serves: a batch
        whose length is not ready runs eager, then switches to compiled. No CUDA graphs are recorded on this
        path, so compiling off the model thread is safe."""

        def on_length(length: int, state: str) -> None:
            if self._metrics:
                self._metrics.compiled_lengths.set(len(runner.compiler.ready))

        runner = self._engine.runner
        assert runner.buckets is not None and runner.compiler is not None
        log.info(
            "serving now: batches run eager until their bucket length is compiled (%d lengths: %s)",
            len(runner.buckets.lengths),
            runner.buckets.lengths,
        )
        thread = threading.Thread(
            target=runner.compile_buckets,
            kwargs={"stop": self._stop_compiling, "on_length": on_length},
            name="compile",
            daemon=True,  # a compilation in progress must not hold up the process's exit
        )
        thread.start()
        return thread

    async def close(self) -> None:
        """Stop taking work, finish what is queued, stop the worker (and compiling, between lengths)."""
        self._closed = True
        self._stop_compiling.set()
        while self._queued_tokens:
            self._room_freed.clear()
            await self._room_freed.wait()
        if self._worker:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._model_thread.shutdown(wait=True)
        self._fetch_thread.shutdown(wait=True)

    async def embed(self, rows: Sequence[Sequence[int]], *, wait: bool) -> np.ndarray:
        """Unit vectors (len(rows), full dims), in order. Raises QueueFullError if full and not `wait`."""
        if self._closed:
            raise UnavailableError("server is shutting down")
        cost = sum(len(row) for row in rows)
        await self._reserve(cost, wait)
        loop = asyncio.get_running_loop()
        items = [_Item(row, loop.create_future()) for row in rows]
        self._pending.extend(items)
        self._update_gauges()
        self._work.set()
        try:
            return np.stack(await asyncio.gather(*(item.future for item in items)))
        except BaseException:
            # Cancelled or failed: whatever has not run yet leaves the queue now.
            for item in items:
                item.future.cancel()
            self._pending = [item for item in self._pending if not item.future.done()]
            raise
        finally:
            self._release(cost)

    async def _reserve(self, cost: int, wait: bool) -> None:
        # A request larger than the whole queue is still admitted when the queue is empty.
        while self._queued_tokens and self._queued_tokens + cost > self._max_queue_tokens:
            if not wait:
                raise QueueFullError(self._queued_tokens, self._max_queue_tokens)
            self._room_freed.clear()
            await self._room_freed.wait()
        self._queued_tokens += cost

    def _release(self, cost: int) -> None:
        self._queued_tokens -= cost
        self._room_freed.set()  # every waiter re-checks whether it fits now
        self._update_gauges()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._work.wait()
            pending_tokens = sum(item.tokens for item in self._pending)
            if pending_tokens < self._max_batch_tokens and self._max_wait_s > 0:
                await asyncio.sleep(self._max_wait_s)  # let a burst gather into one batch
            self._work.clear()
            round_items, self._pending = self._pending, []
            self._update_gauges()  # the round's texts are running now, not waiting
            round_items = [item for item in round_items if not item.future.done()]
            if not round_items:
                continue
            for batch_indices in self._engine.runner.plan(
                [item.tokens for item in round_items], self._max_batch_tokens
            ):
                batch = [round_items[i] for i in batch_indices if not round_items[i].future.done()]
                if batch:
                    await self._run_batch(loop, batch)
            self._update_gauges()

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        """Launch one forward pass; its vectors are delivered once back, while the next batch launches.
        Out of memory: halve the batch and retry each half; a single row that still does not fit fails
        alone (RESOURCE_EXHAUSTED), and every other row gets its vector."""
        started = time.monotonic()
        await self._launch_slots.acquire()
        try:
            pending = await loop.run_in_executor(self._model_thread, self._launch, [i.ids for i in batch])
        except Exception as error:  # the batch fails, the server does not
            self._launch_slots.release()
            if is_out_of_memory(error):
                free_accelerator_memory()
                if len(batch) > 1:
                    log.warning("out of memory on %d rows x %d tokens: halving", len(batch), batch[0].tokens)
                    half = len(batch) // 2
                    await self._run_batch(loop, batch[:half])
                    await self._run_batch(loop, batch[half:])
                    return
                error = InputTooLargeError(f"a text of {batch[0].tokens} tokens does not fit in accelerator memory")
            else:
                log.exception("forward pass failed for a batch of %d", len(batch))
            self._fail(batch, error)
            return
        if pending.eager_reason is not None and self._metrics:
            self._metrics.eager_batches.labels(pending.eager_reason).inc()
        if pending.ready:
            self._deliver(batch, pending.wait(), started)
            self._launch_slots.release()
            return
        task = loop.create_task(self._finish(loop, batch, pending, started))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    def _launch(self, rows: list[Sequence[int]]) -> PendingVectors:
        """In the model thread: the eager reference `forward` without buckets, else a bucketed launch."""
        return self._engine.runner.launch(rows)

    async def _finish(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Item], pending: PendingVectors, started: float
    ) -> None:
        try:
            vectors = await loop.run_in_executor(self._fetch_thread, pending.wait)
        except Exception as error:
            log.exception("forward pass failed for a batch of %d", len(batch))
            self._fail(batch, error)
        else:
            self._deliver(batch, vectors, started)
        finally:
            self._launch_slots.release()

    @staticmethod
    def _fail(batch: list[_Item], error: BaseException) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)

    def _deliver(self, batch: list[_Item], vectors: np.ndarray, started: float) -> None:
        for item, vector in zip(batch, vectors, strict=True):
            if not item.future.done():
                item.future.set_result(vector)
        if self._metrics:
            longest = max(item.tokens for item in batch)
            buckets = self._engine.runner.buckets
            rows, length = buckets.shape_for(len(batch), longest) if buckets else (len(batch), longest)
            self._metrics.observe_batch(
                rows=len(batch),
                real_tokens=sum(item.tokens for item in batch),
                padded_tokens=rows * length,
                seconds=time.monotonic() - started,
            )

    def _update_gauges(self) -> None:
        if self._metrics:
            self._metrics.queue_requests.set(len(self._pending))
            self._metrics.queue_tokens.set(self._queued_tokens)
