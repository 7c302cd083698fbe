"""The server process: one engine, batcher and index, the doors over them (gRPC, with health, reflection and
metrics), and their lifecycle.

Lifecycle: bind -> health NOT_SERVING -> warm the model up -> SERVING. On SIGTERM (or stop()):
health NOT_SERVING, new calls get UNAVAILABLE, in-flight calls get `grace_s` to finish, then the
batcher drains and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from scholarembed.v1 import embedding_pb2, embedding_pb2_grpc, search_pb2, search_pb2_grpc

from .batcher import Batcher
from .config import ServerConfig, batch_token_budget
from .embedder import TextEmbedder
from .engine import EmbeddingEngine
from .grpc.embedding import EmbeddingServicer
from .grpc.search import SearchServicer
from .index import open_index
from .metrics import Metrics
from .model.buckets import LengthBuckets, Tail
from .model.compilation import load_artifacts, use_compile_cache
from .searcher import Searcher
from .security import BearerTokenInterceptor, server_credentials

if TYPE_CHECKING:
    from .http import HttpDoor

log = logging.getLogger(__name__)

EMBEDDING_SERVICE = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
SEARCH_SERVICE = search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name


def load_engine(config: ServerConfig) -> EmbeddingEngine:
    return EmbeddingEngine.load(
        config.model,
        device=config.device,
        dtype=config.dtype,
        max_tokens=config.max_tokens,
        revision=config.revision,
        matryoshka_dims=config.matryoshka_dim_list,
    )


def with_buckets(engine: EmbeddingEngine, config: ServerConfig) -> EmbeddingEngine:
    """The engine as the config's --compile and --buckets flags want it: eager at each batch's own shape
    (the CPU default), or in static bucket shapes, compiled (the CUDA default) or not."""
    if config.compile not in ("auto", "on", "off"):
        raise ValueError(f"--compile {config.compile!r}: use auto, on or off")
    device_type = engine.model.device.type
    compiling = config.compile == "on" or (config.compile == "auto" and device_type == "cuda")
    if engine.runner.buckets is not None or config.buckets == "off" or (config.buckets == "auto" and not compiling):
        if compiling and engine.runner.buckets is None:
            raise ValueError("--compile needs static shapes: --buckets must not be off")
        return engine
    if compiling:
        use_compile_cache(config.compile_cache_dir)
        if config.compile_artifacts:
            load_artifacts(config.compile_artifacts)
    buckets = LengthBuckets.create(
        None if config.buckets in ("auto", "on") else config.buckets,
        max_tokens=engine.max_tokens,
        max_batch_tokens=batch_token_budget(config.max_batch_tokens, device_type),
        tail=Tail(config.tail),
        row_step=config.bucket_row_step,
    )
    log.info("bucket lengths %s, %d static shapes, compile %s", buckets.lengths, len(buckets.shapes()), compiling)
    return engine.with_buckets(
        buckets,
        compile_mode=config.compile_mode if compiling else None,
    )


class EmbeddingServer:
    """A running scholarembed server. Build it with `create_server`."""

    def __init__(self, config: ServerConfig, engine: EmbeddingEngine) -> None:
        config = dataclasses.replace(
            config, max_batch_tokens=batch_token_budget(config.max_batch_tokens, engine.model.device.type)
        )
        self.config = config
        self.engine = engine = with_buckets(engine, config)
        self.metrics = Metrics()
        self.health = health_aio.HealthServicer()
        tokens = config.auth_tokens()
        self.server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(tokens, open_probes=config.auth_open_probes)] if tokens else [],
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_concurrent_streams", config.max_concurrent_streams),
                # Keepalive enforcement. The option names must be exact: gRPC ignores misspelt ones silently.
                ("grpc.http2.min_ping_interval_without_data_ms", config.keepalive_min_ping_interval_ms),
                ("grpc.http2.max_ping_strikes", 2),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        self.credentials = server_credentials(config)
        self.batcher = Batcher(
            engine,
            max_batch_tokens=config.max_batch_tokens,
            max_queue_tokens=config.max_queue_tokens,
            max_wait_s=config.max_wait_ms / 1000,
            metrics=self.metrics,
        )
        self.embedder = TextEmbedder(engine, self.batcher, config)
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(
            EmbeddingServicer(self.embedder, config, self.metrics), self.server
        )
        self.services = [EMBEDDING_SERVICE]
        self.index = open_index(config, engine.model.device, engine.matryoshka_dims)
        self.searcher: Searcher | None = None
        if self.index is not None:
            self.searcher = Searcher(self.embedder, self.index, config)
            self.metrics.watch_index(self.index)
            search_pb2_grpc.add_SearchServiceServicer_to_server(
                SearchServicer(self.searcher, config, self.metrics), self.server
            )
            self.services.append(SEARCH_SERVICE)
        self.http: HttpDoor | None = None
        self.http_port: int | None = None
        if config.http_port is not None:
            from .http import HttpDoor  # the http extra (fastapi, uvicorn) is needed only with --http-port

            self.http = HttpDoor(config, self.embedder, self.searcher, self.metrics)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        self.port = 0
        self.metrics_port: int | None = None

    async def start(self) -> int:
        """Bind, serve health (NOT_SERVING), warm up, then report SERVING. Returns the bound port."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        if self.credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, self.credentials)
        if self.port == 0:
            raise OSError(f"could not bind {self.config.host}:{self.config.port}")
        await self.server.start()
        if self.http is not None:
            self.http_port = await self.http.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.config.metrics_port, self.config.host)
        self.batcher.start()
        # Compiling layers: SERVING once the eager path is warm; lengths switch to compiled as they become ready.
        serve_early = self.engine.runner.compiler is not None
        await self.batcher.warmup(compile=not serve_early)
        self.embedder.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if serve_early:
            self.batcher.compile_in_background()
        if self.config.port_file:
            Path(self.config.port_file).write_text(str(self.port))
        log.info(
            "serving %s on %s:%d (metrics port %s)",
            self.engine.model_id,
            self.config.host,
            self.port,
            self.metrics_port,
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, let in-flight calls finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        grace = self.config.grace_s if grace is None else grace
        await asyncio.gather(self.server.stop(grace), *([self.http.stop(grace)] if self.http is not None else []))
        await self.batcher.close()
        self.embedder.close()
        if self.searcher is not None:
            self.searcher.close()
        if self.index is not None:
            self.index.close()  # flushed and closed cleanly: nothing to repair on the next start
        log.info("stopped")

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for service in ("", *self.services):
            await self.health.set(service, status)


async def create_server(config: ServerConfig, engine: EmbeddingEngine | None = None) -> tuple[EmbeddingServer, int]:
    """Load the model (unless given), start serving, and return (server, bound port)."""
    if engine is None:
        engine = await asyncio.get_running_loop().run_in_executor(None, load_engine, config)
    server = EmbeddingServer(config, engine)
    port = await server.start()
    return server, port


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully."""
    server, _port = await create_server(config)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop_requested.set)
    await stop_requested.wait()
    log.info("signal received: draining for up to %.1fs", config.grace_s)
    await server.stop()
