"""The runner: token rows -> unit vectors on one device, driven from one thread (the model thread).

It owns what is about running rather than about the model: padding, the static bucket shapes, host <-> device
copies on CUDA streams, and the compiled layers of each bucket length. A `LoadedModel` can have several
runners (say, eager and compiled, or different bucket sets); each has its own compiler and copy stream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .buckets import LengthBuckets
from .compilation import MIN_DYNAMIC_ROWS, RegionalCompiler, fx_graph_cache_counts, graphs_compiled
from .loading import LoadedModel

log = logging.getLogger(__name__)


def plan_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Group indices into batches whose padded size (rows x longest row) fits the token budget.

    Indices are sorted by length, longest first, so each batch holds similar lengths and padding
    stays small. A single row longer than the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Sorted descending, so the first row of a batch is its longest.
        longest = lengths[current[0]] if current else lengths[index]
        if current and (len(current) + 1) * longest > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


class PendingVectors:
    """The vectors of a launched batch. On CUDA they are still being computed and copied to pinned host
    memory when `launch` returns; `wait()` blocks until they are there. Elsewhere they are ready."""

    def __init__(self, host: torch.Tensor, rows: int, done: Any = None, eager_reason: str | None = None) -> None:
        self._host = host  # (padded rows, dims) float32 on the host
        self._rows = rows  # real rows: dummy rows beyond them are dropped
        self._done = done  # a torch.cuda.Event recorded after the copy, or None
        # Why a compiled runner ran this batch eagerly: "compiling" (its length is not ready yet) or "failed".
        self.eager_reason = eager_reason

    @classmethod
    def of(cls, vectors: np.ndarray, eager_reason: str | None = None) -> PendingVectors:
        """Vectors already computed."""
        return cls(torch.from_numpy(vectors), len(vectors), eager_reason=eager_reason)

    @property
    def ready(self) -> bool:
        return self._done is None or bool(self._done.query())

    def wait(self) -> np.ndarray:
        """(rows, full dims) float32 unit vectors, one per real row, in order."""
        if self._done is not None:
            self._done.synchronize()
        # A copy, so the pinned block goes back to its pool instead of living on in the results.
        return self._host[: self._rows].numpy().copy()


class DeviceRunner:
    """Embeds batches of token rows with `model` on its device.

    Without buckets every batch runs eagerly at its own shape (`forward`, the reference). With buckets it is
    padded to a static bucket shape; with a compile mode too, the model's repeated layer is compiled once per
    bucket length (`compile_buckets`, possibly on another thread while this one serves) and a batch whose
    length is not compiled yet runs eagerly meanwhile, so it is never worse than eager.
    """

    def __init__(
        self,
        model: LoadedModel,
        buckets: LengthBuckets | None = None,
        *,
        compile_mode: str | None = None,
        compile_backend: str | Callable[..., Any] = "inductor",
    ) -> None:
        if compile_mode is not None and buckets is None:
            raise ValueError("compiling needs static shapes: give bucket lengths")
        self.model = model
        self.buckets = buckets
        self.compile_mode = compile_mode
        self.compiler = (
            RegionalCompiler(model.encoder, buckets.lengths, mode=compile_mode, backend=compile_backend)
            if buckets is not None and compile_mode is not None
            else None
        )
        self.compile_seconds = 0.0
        # Inputs go up on a stream of their own, so the next batch's copy overlaps this batch's compute.
        self._copy_stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None

    @torch.inference_mode()
    def forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Embed a ready batch of token-id rows: (n, full dims) float32 unit vectors, one per row, in order.

        The eager reference: the batch runs at its own shape. Rows are right-padded; padding never
        changes a vector because pooling ignores masked positions and every position's attention is
        masked to real tokens.
        """
        input_ids, attention_mask = self.padded(batch, len(batch), max(len(row) for row in batch))
        input_ids = input_ids.to(self.model.device, non_blocking=True)
        attention_mask = attention_mask.to(self.model.device, non_blocking=True)
        return self.model.embed(input_ids, attention_mask).cpu().numpy()

    def plan(self, lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
        """Row indices grouped into batches: by bucket (with the buckets' own budget) when buckets are on,
        else by `plan_batches`. Every index appears exactly once."""
        if self.buckets is not None:
            return self.buckets.plan(lengths)
        return plan_batches(lengths, max_batch_tokens)

    @torch.inference_mode()
    def launch(self, batch: Sequence[Sequence[int]]) -> PendingVectors:
        """Start embedding a batch; `.wait()` on the result gives what `forward(batch)` gives.

        With buckets, the batch is padded to its bucket shape (dummy rows hold one pad token and are
        dropped). On CUDA this returns once the work is queued: inputs go up from pinned memory on a
        side stream, the vectors come back to pinned memory asynchronously, so the caller can prepare
        the next batch while the GPU runs this one.
        """
        longest = max(len(row) for row in batch)
        if self.buckets is None or longest > self.buckets.lengths[-1]:
            return PendingVectors.of(self.forward(batch))
        rows, length = self.buckets.shape_for(len(batch), longest)
        if self.compiler is not None:
            state = self.compiler.state(length)
            if state != "ready":  # never worse than eager: the batch runs at its own shape meanwhile
                return PendingVectors.of(self.forward(batch), eager_reason=state)
            rows = max(rows, MIN_DYNAMIC_ROWS)
        pinned = self.model.device.type == "cuda"
        input_ids, attention_mask = self.padded(batch, rows, length, pin_memory=pinned)
        attention_mask[len(batch) :, 0] = 1  # dummy rows: one pad token each, so no row is fully masked
        input_ids, attention_mask = self.to_device(input_ids, attention_mask)
        if self.compiler is not None:
            with self.compiler.active():
                vectors = self.model.embed(input_ids, attention_mask)
        else:
            vectors = self.model.embed(input_ids, attention_mask)
        if not pinned:
            return PendingVectors(vectors.cpu(), len(batch))
        host = torch.empty(vectors.shape, dtype=vectors.dtype, pin_memory=True)
        host.copy_(vectors, non_blocking=True)
        done = torch.cuda.Event()
        # On the model's device's stream, not the thread's current device's (0 unless set): on cuda:1 an
        # event recorded on cuda:0 would report the copy done before it had run.
        done.record(torch.cuda.current_stream(self.model.device))
        return PendingVectors(host, len(batch), done)

    def forward_planned(self, rows: Sequence[Sequence[int]], max_batch_tokens: int = 16384) -> np.ndarray:
        """Embed any number of token-id rows in length-sorted token-budget batches (see `plan`):
        (n, full dims) float32 unit vectors, one per row, in order."""
        vectors = np.empty((len(rows), self.model.dimensions), dtype=np.float32)
        in_flight: deque[tuple[list[int], PendingVectors]] = deque()
        for batch in self.plan([len(row) for row in rows], max_batch_tokens):
            in_flight.append((batch, self.launch([rows[i] for i in batch])))
            if len(in_flight) > 1:  # one batch queued behind the running one keeps the GPU busy
                done, pending = in_flight.popleft()
                vectors[done] = pending.wait()
        for done, pending in in_flight:
            vectors[done] = pending.wait()
        return vectors

    def padded(
        self, batch: Sequence[Sequence[int]], rows: int, length: int, *, pin_memory: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, length) ids and mask on the host, right-padded; rows beyond the batch are all padding."""
        pad_id = self.model.tokenization.pad_id
        input_ids = torch.full((rows, length), pad_id, dtype=torch.long, pin_memory=pin_memory)
        attention_mask = torch.zeros((rows, length), dtype=torch.long, pin_memory=pin_memory)
        for row_index, row in enumerate(batch):
            input_ids[row_index, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            attention_mask[row_index, : len(row)] = 1
        return input_ids, attention_mask

    def to_device(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Host -> device; on CUDA from pinned memory on the copy stream, which the compute stream waits for."""
        device = self.model.device
        if self._copy_stream is None:
            return tuple(tensor.to(device) for tensor in tensors)
        compute = torch.cuda.current_stream(device)
        self._copy_stream.wait_stream(compute)  # the copy may reuse memory the compute stream just freed
        with torch.cuda.stream(self._copy_stream):
            moved = tuple(tensor.to(device, non_blocking=True) for tensor in tensors)
        compute.wait_stream(self._copy_stream)
        for tensor in moved:
            tensor.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        return moved

    def warmup(self, *, compile: bool = True) -> None:
        """Run the shortest and the longest input once, so the first request pays no allocation cost; then,
        if compiling and `compile`, compile every bucket length (`compile_buckets`). With compile=False the
        lengths can be compiled later, e.g. on another thread, while batches of the rest run eager."""
        short = self._warmup_ids()
        max_tokens = self.model.max_tokens
        self.forward([short])
        self.forward([(short * max_tokens)[:max_tokens]])
        if self.compiler is not None and compile:
            self.compile_buckets()

    def _warmup_ids(self) -> list[int]:
        return self.model.tokenization.tokenize(["warmup"])[0].ids

    def compile_buckets(
        self, stop: threading.Event | None = None, on_length: Callable[[int, str], None] | None = None
    ) -> None:
        """Compile the repeated layer for every bucket length not compiled yet, shortest first. A length whose
        compilation fails is logged and stays eager; `on_length(length, state)` follows each length; `stop`
        ends the loop between lengths."""
        assert self.buckets is not None and self.compiler is not None
        started = time.perf_counter()
        graphs_before = graphs_compiled()
        for length in self.buckets.lengths:
            if stop is not None and stop.is_set():
                return
            if self.compiler.state(length) == "compiling":
                self.compile_length(length)
                if on_length is not None:
                    on_length(length, self.compiler.state(length))
        self.compile_seconds = time.perf_counter() - started
        log.info(
            "%d of %d bucket lengths compiled (%d graphs, torch.compile mode %s) in %.1fs%s",
            len(self.compiler.ready),
            len(self.buckets.lengths),
            graphs_compiled() - graphs_before,
            self.compile_mode,
            self.compile_seconds,
            f"; eager for good: {sorted(self.compiler.failed)}" if self.compiler.failed else "",
        )

    def compile_length(self, length: int) -> None:
        """Compile (or load from the cache) the layer for one bucket length, at its smallest and largest row
        counts, then mark it ready; on failure mark it failed, and log why either way."""
        assert self.buckets is not None and self.compiler is not None
        compiler = self.compiler
        started = time.perf_counter()
        graphs_before = graphs_compiled()
        hits_before, misses_before = fx_graph_cache_counts()
        short = self._warmup_ids()
        ladder = self.buckets.row_ladder(length)
        try:
            with torch.inference_mode(), compiler.active():
                for rows in sorted({max(ladder[0], MIN_DYNAMIC_ROWS), max(ladder[-1], MIN_DYNAMIC_ROWS)}):
                    input_ids, attention_mask = self.padded([short] * rows, rows, length)
                    attention_mask[:, : len(short)] = 1
                    input_ids, attention_mask = self.to_device(input_ids, attention_mask)
                    self.model.embed(input_ids, attention_mask)
            if self.model.device.type == "cuda":
                torch.cuda.synchronize(self.model.device)
        except Exception as error:  # e.g. an inductor failure: this length stays eager, the server serves
            compiler.failed[length] = _root_cause(error)
            log.warning("bucket length %d runs eager: its compilation failed (%s)", length, compiler.failed[length])
            return
        compiler.ready.add(length)
        hits, misses = fx_graph_cache_counts()
        log.info(
            "bucket length %d compiled in %.1fs: %d graphs, %d loaded from the compile cache, %d compiled anew",
            length,
            time.perf_counter() - started,
            graphs_compiled() - graphs_before,
            hits - hits_before,
            misses - misses_before,
        )


def _root_cause(error: BaseException) -> str:
    """The innermost exception of a chain, in one line: dynamo wraps a backend's error in its own."""
    while error.__cause__ is not None or getattr(error, "inner_exception", None) is not None:
        error = error.__cause__ or error.inner_exception  # type: ignore[attr-defined]
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
