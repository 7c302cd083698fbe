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
- Supervised (see `lifecycle` for what is fatal): a failure while planning a round, running a batch,
  waiting for its vectors or handing them out fails only the callers it touches, and the worker goes
  on. A fatal one (a poisoned CUDA context, the worker dying, the model thread not returning within
  `forward_timeout_s`) fails every waiting caller at once with UNAVAILABLE and refuses new ones.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from .engine import EmbeddingEngine
from .errors import InputTooLargeError, QueueFullError, ScholarEmbedError, ServerBrokenError, UnavailableError
from .lifecycle import describe, is_fatal, shut_down
from .metrics import Metrics
from .model.runner import PendingVectors

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    """The one queue and its worker. Supervised: a failure within a round (planning it, launching a batch,
    waiting for its vectors, handing them out) fails the callers it touches and the worker goes on; a
    fatal one (`lifecycle.is_fatal`, the worker or a collecting task dying, the model thread not returning
    within `forward_timeout_s`) fails every caller waiting at once, refuses new ones (ServerBrokenError,
    UNAVAILABLE) and calls `on_fatal(cause)` once."""

    def __init__(
        self,
        engine: EmbeddingEngine,
        *,
        max_batch_tokens: int,
        max_queue_tokens: int,
        max_wait_s: float = 0.002,
        metrics: Metrics | None = None,
        max_in_flight: int = 2,
        forward_timeout_s: float = 300.0,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self._engine = engine
        self._max_batch_tokens = max_batch_tokens
        self._max_queue_tokens = max_queue_tokens
        self._max_wait_s = max_wait_s
        self._metrics = metrics
        self._forward_timeout_s = forward_timeout_s
        self._on_fatal = on_fatal
        self._pending: list[_Item] = []
        self._unanswered: set[_Item] = set()  # queued, in a round or in flight: whom a fatal failure must tell
        self._queued_tokens = 0  # pending plus in-flight rows: what backpressure counts
        self._room_freed = asyncio.Event()
        self._work = asyncio.Event()
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._fetch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetch")
        self._launch_slots = asyncio.Semaphore(max_in_flight)  # batches launched whose vectors are not back
        self._collecting: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._broken: str | None = None  # the cause, once a fatal failure has happened
        self._stop_compiling = threading.Event()

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="worker")
        self._worker.add_done_callback(self._supervise)

    async def warmup(self, *, compile: bool = True) -> None:
        """Warm the engine up (compiling its bucket lengths, if any, unless not `compile`) in the thread that
        will run the model. Start-up has no watchdog: compiling takes as long as it takes, and a failure there
        is a start-up failure."""
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
        """Stop taking work, finish what is queued, stop the worker (and compiling, between lengths).
        Never blocks the event loop; once broken, it leaves the model threads behind instead of joining
        them (one may be stuck in the device for good)."""
        self._closed = True
        self._stop_compiling.set()
        while self._queued_tokens and self._broken is None:
            self._room_freed.clear()
            await self._room_freed.wait()
        tasks = [task for task in (self._worker, *self._collecting) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # a dead worker's error has been reported already
        for thread in (self._model_thread, self._fetch_thread):
            await shut_down(thread, wait=self._broken is None)

    async def embed(self, rows: Sequence[Sequence[int]], *, wait: bool) -> np.ndarray:
        """Unit vectors (len(rows), full dims), in order. Raises QueueFullError if full and not `wait`,
        ServerBrokenError once the server is broken."""
        self._check_open()
        cost = sum(len(row) for row in rows)
        await self._reserve(cost, wait)
        loop = asyncio.get_running_loop()
        items = [_Item(row, loop.create_future()) for row in rows]
        self._pending.extend(items)
        self._unanswered.update(items)
        self._update_gauges()
        self._work.set()
        try:
            return np.stack(await asyncio.gather(*(item.future for item in items)))
        except BaseException:
            # Cancelled or failed: whatever has not run yet leaves the queue now.
            for item in items:
                if not item.future.cancel() and not item.future.cancelled():
                    item.future.exception()  # retrieved here: a batch's error reaches its caller once, not as a warning
            self._pending = [item for item in self._pending if not item.future.done()]
            raise
        finally:
            self._unanswered.difference_update(items)
            self._release(cost)

    def _check_open(self) -> None:
        if self._broken is not None:
            raise ServerBrokenError(self._broken)
        if self._closed:
            raise UnavailableError("server is shutting down")

    async def _reserve(self, cost: int, wait: bool) -> None:
        # A request larger than the whole queue is still admitted when the queue is empty.
        while self._queued_tokens and self._queued_tokens + cost > self._max_queue_tokens:
            if not wait:
                raise QueueFullError(self._queued_tokens, self._max_queue_tokens)
            self._room_freed.clear()
            await self._room_freed.wait()
            if self._broken is not None:
                raise ServerBrokenError(self._broken)
        self._queued_tokens += cost

    def _release(self, cost: int) -> None:
        self._queued_tokens -= cost
        self._room_freed.set()  # every waiter re-checks whether it fits now
        self._update_gauges()

    async def _run(self) -> None:
        """The worker: round after round until the server breaks; whatever escapes here is fatal (`_supervise`)."""
        loop = asyncio.get_running_loop()
        while self._broken is None:
            round_items = await self._next_round()
            if not round_items:
                continue
            try:
                batches = self._plan(round_items)
            except Exception as error:  # the round fails, the server does not
                self._fail(round_items, error, "planning a round")
                continue
            for planned in batches:
                batch = [item for item in planned if not item.future.done()]
                if batch and self._broken is None:
                    await self._run_batch(loop, batch)
            self._update_gauges()

    async def _next_round(self) -> list[_Item]:
        """Everything queued, once there is something (waiting up to max_wait_s for company)."""
        await self._work.wait()
        pending_tokens = sum(item.tokens for item in self._pending)
        if pending_tokens < self._max_batch_tokens and self._max_wait_s > 0:
            await asyncio.sleep(self._max_wait_s)  # let a burst gather into one batch
        self._work.clear()
        round_items, self._pending = self._pending, []
        self._update_gauges()  # the round's texts are running now, not waiting
        return [item for item in round_items if not item.future.done()]

    def _plan(self, round_items: list[_Item]) -> list[list[_Item]]:
        plan = self._engine.runner.plan([item.tokens for item in round_items], self._max_batch_tokens)
        # A row planned twice would get two vectors; a row left out would wait forever.
        if sorted(index for batch in plan for index in batch) != list(range(len(round_items))):
            raise RuntimeError(f"the plan does not hold each of the round's {len(round_items)} rows once")
        return [[round_items[index] for index in batch] for batch in plan]

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        """Launch one forward pass; its vectors are collected once back, while the next batch launches.
        Out of memory: halve the batch and retry each half; a single row that still does not fit fails
        alone (RESOURCE_EXHAUSTED), and every other row gets its vector."""
        started = time.monotonic()
        await self._launch_slots.acquire()
        try:
            pending = await self._call(self._model_thread, "a forward pass", self._launch, [i.ids for i in batch])
            back_already = pending.ready
        except Exception as error:
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
            self._fail(batch, error, "a forward pass")
            return
        if pending.eager_reason is not None and self._metrics:
            self._metrics.eager_batches.labels(pending.eager_reason).inc()
        if back_already:
            await self._collect(batch, pending, started)
            return
        task = loop.create_task(self._collect(batch, pending, started), name="collecting")
        self._collecting.add(task)
        task.add_done_callback(self._collecting.discard)
        task.add_done_callback(self._supervise)

    def _launch(self, rows: list[Sequence[int]]) -> PendingVectors:
        """In the model thread: the eager reference `forward` without buckets, else a bucketed launch."""
        return self._engine.runner.launch(rows)

    async def _collect(self, batch: list[_Item], pending: PendingVectors, started: float) -> None:
        """Wait for a launched batch's vectors (in the fetch thread unless they are back) and hand them
        out; a failure of either fails this batch's callers only."""
        try:
            if pending.ready:
                vectors = pending.wait()
            else:
                vectors = await self._call(self._fetch_thread, "waiting for a batch's vectors", pending.wait)
            self._deliver(batch, vectors, started)
        except Exception as error:
            self._fail(batch, error, "collecting a batch's vectors")
        finally:
            self._launch_slots.release()

    async def _call(self, thread: ThreadPoolExecutor, what: str, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in `thread`, under the watchdog: a call that has not returned after
        forward_timeout_s means the model thread cannot be reached, which is fatal."""
        future = asyncio.get_running_loop().run_in_executor(thread, function, *args)
        done, _ = await asyncio.wait({future}, timeout=self._forward_timeout_s)
        if not done:
            future.add_done_callback(lambda late: late.cancelled() or late.exception())  # its error, if any, is moot
            self._break(f"the model thread has not returned from {what} in {self._forward_timeout_s:g}s")
            assert self._broken is not None
            raise ServerBrokenError(self._broken)
        return future.result()

    def _fail(self, items: list[_Item], error: BaseException, stage: str) -> None:
        """`stage` failed for these callers: a fatal error breaks the server, any other fails them alone."""
        if is_fatal(error):
            self._break(f"{stage} failed: {describe(error)}", error)
            return
        if not isinstance(error, ScholarEmbedError):  # a domain error (a text too large) is the caller's to see
            log.error("%s failed for %d texts: %s", stage, len(items), describe(error), exc_info=error)
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)

    def _supervise(self, task: asyncio.Task[None]) -> None:
        """The worker or a collecting task ended: an error there has lost callers it was serving: fatal."""
        if not task.cancelled() and (error := task.exception()) is not None:
            self._break(f"the batcher's {task.get_name()} task died: {describe(error)}", error)

    def _break(self, cause: str, error: BaseException | None = None) -> None:
        """Fatal: every caller waiting gets ServerBrokenError now, new ones are refused, the worker stops,
        and `on_fatal` hears the cause once."""
        if self._broken is not None:
            return
        self._broken = cause
        log.debug("fatal failure in the batcher", exc_info=error)  # the traceback, for whoever debugs it
        broken = ServerBrokenError(cause)
        for item in self._unanswered:
            if not item.future.done():
                item.future.set_exception(broken)
        self._pending = []
        self._work.set()  # the worker wakes up to see it is over
        self._room_freed.set()  # and so does every caller waiting for room
        if self._on_fatal is not None:
            self._on_fatal(cause)

    def _deliver(self, batch: list[_Item], vectors: np.ndarray, started: float) -> None:
        if len(vectors) != len(batch):  # checked first, so that no caller of a bad batch gets a wrong vector
            raise RuntimeError(f"{len(vectors)} vectors came back for a batch of {len(batch)} texts")
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
