"""The server's embedding path for doors that run the engine in their own process and call synchronously:
Triton's model.py, the CLI's in-process `embed`, Ray's engine actors.

`InProcessEmbedder(config)` loads the engine from the same settings as `serve` (`app.load_engine`,
`app.with_buckets`), runs the shared `Batcher` and `TextEmbedder` on an event loop of its own thread,
and answers `scholarembed.v1.EmbedRequest`s exactly as the gRPC door does: the same validation, limits,
prompts, token-budget batches, out-of-memory halving and wire encodings. Errors are the domain
exceptions of `errors`, for each door to put in its own words.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections import deque
from collections.abc import Coroutine, Iterable, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from scholarembed.v1 import embedding_pb2 as pb

from .app import load_engine, with_buckets
from .batcher import Batcher
from .config import ServerConfig, batch_token_budget
from .embedder import TextEmbedder
from .engine import EmbeddingEngine

T = TypeVar("T")


class InProcessEmbedder:
    """The engine, batcher and embedder of one process; use as a context manager, or close()."""

    def __init__(self, config: ServerConfig, engine: EmbeddingEngine | None = None) -> None:
        engine = engine if engine is not None else load_engine(config)
        config = dataclasses.replace(
            config, max_batch_tokens=batch_token_budget(config.max_batch_tokens, engine.device.type)
        )
        self.config = config
        self.engine = with_buckets(engine, config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="in-process-embedder", daemon=True)
        self._thread.start()
        try:
            self.embedder: TextEmbedder = self._run(self._start())
        except BaseException:
            self._stop_loop()
            raise

    async def _start(self) -> TextEmbedder:
        """As `EmbeddingServer.start`: warm up (eager first when compiling layers, which then compile in
        the background), and only then take requests."""
        batcher = Batcher(
            self.engine,
            max_batch_tokens=self.config.max_batch_tokens,
            max_queue_tokens=self.config.max_queue_tokens,
            max_wait_s=self.config.max_wait_ms / 1000,
        )
        embedder = TextEmbedder(self.engine, batcher, self.config)
        batcher.start()
        compile_later = self.engine.compiles_layers
        await batcher.warmup(compile=not compile_later)
        if compile_later:
            batcher.compile_in_background()
        embedder.ready = True
        return embedder

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def submit(self, request: pb.EmbedRequest) -> Future[pb.EmbedResponse]:
        """Start embedding one request; the future holds its EmbedResponse, or the domain error. Requests
        in flight together are batched together."""
        # wait=True: a full queue holds the caller back, as a stream is held back, instead of refusing.
        return asyncio.run_coroutine_threadsafe(self.embedder.embed_request(request, wait=True), self._loop)

    def embed(self, request: pb.EmbedRequest) -> pb.EmbedResponse:
        return self.submit(request).result()

    def embed_many(self, requests: Iterable[pb.EmbedRequest], window: int = 8) -> Iterator[pb.EmbedResponse]:
        """One response per request, in order, with up to `window` requests in flight (so the batcher
        forms full batches and tokenizes the next while the model runs); `requests` is read lazily. The
        first failed request raises its error, and the requests in flight behind it are dropped."""
        in_flight: deque[Future[pb.EmbedResponse]] = deque()
        try:
            for request in requests:
                in_flight.append(self.submit(request))
                if len(in_flight) >= window:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for future in in_flight:
                future.cancel()

    def close(self) -> None:
        """Finish what is queued, stop the batcher and the loop's thread."""
        if self._thread.is_alive():
            self._run(self.embedder.batcher.close())
            self.embedder.close()
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> InProcessEmbedder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
