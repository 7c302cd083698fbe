"""The server's embedding path for doors that run the engine in their own process and call synchronously:
Triton's model.py, the CLI's in-process `embed`, Ray's engine actors.

`InProcessEmbedder(config)` loads the engine from the same settings as `serve` (`app.load_engine`) and
builds the same `app.EmbeddingPath` (the engine's shape, the shared `Batcher` and `TextEmbedder`), on an
event loop of its own thread,
and answers `scholarembed.v1.EmbedRequest`s exactly as the gRPC door does: the same validation, limits,
prompts, token-budget batches, out-of-memory halving and wire encodings. Errors are the domain
exceptions of `errors`, for each door to put in its own words.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Coroutine, Iterable, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from scholarembed.v1 import embedding_pb2 as pb

from .app import EmbeddingPath, load_engine
from .config import ServerConfig
from .engine import EmbeddingEngine

T = TypeVar("T")


class InProcessEmbedder:
    """The engine, batcher and embedder of one process; use as a context manager, or close()."""

    def __init__(self, config: ServerConfig, engine: EmbeddingEngine | None = None) -> None:
        self.path = EmbeddingPath.build(config, engine if engine is not None else load_engine(config))
        self.config = self.path.config
        self.engine = self.path.engine
        self.embedder = self.path.embedder
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="in-process-embedder", daemon=True)
        self._thread.start()
        try:
            self._run(self.path.start())  # as the server starts: warm, then take requests
        except BaseException:
            self._stop_loop()
            raise

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
            self._run(self.path.close())
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
