"""The server process: one engine, batcher and index, the doors over them (gRPC, with health, reflection and
metrics), and their lifecycle.

Lifecycle: check the ports -> load the model -> bind -> health NOT_SERVING -> warm the model up -> SERVING,
and a banner with every address. On SIGTERM (or stop()): health NOT_SERVING, new calls get UNAVAILABLE,
in-flight calls get `grace_s` to finish, then the batcher drains and stops, and `serve` returns 0. On a fatal
failure (see `lifecycle`): one log line with the cause, health NOT_SERVING on every door, every waiting caller
and every new call gets UNAVAILABLE, the server stops within FATAL_GRACE_S, and `serve` returns EXIT_BROKEN.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shlex
import signal
import socket
from collections.abc import Callable
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
from .grpc.admission import CallGate
from .grpc.embedding import EmbeddingServicer
from .grpc.search import SearchServicer, search_disabled_handler
from .index import open_index
from .lifecycle import EXIT_BROKEN, Phase, ServingState
from .metrics import Metrics
from .model.buckets import LengthBuckets, Tail
from .model.compilation import load_artifacts, use_compile_cache
from .searcher import Searcher
from .security import BearerTokenInterceptor, server_credentials

if TYPE_CHECKING:
    from .http import HttpDoor

log = logging.getLogger(__name__)

# After a fatal failure every waiting caller has had its error already: this is for the errors to go out.
FATAL_GRACE_S = 1.0

EMBEDDING_SERVICE = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
SEARCH_SERVICE = search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name
# The ports a server binds: config field, what listens there, the flags that change it.
PORTS = (
    ("port", "gRPC", "--port"),
    ("http_port", "HTTP", "--http-port (or --no-http)"),
    ("metrics_port", "metrics", "--metrics-port (or --no-metrics)"),
)
# The first command the banner offers on an empty store, when serve runs in a clone of the repository.
SAMPLE_CORPUS = Path("examples/papers.jsonl")


def load_engine(config: ServerConfig) -> EmbeddingEngine:
    return EmbeddingEngine.load(
        config.model,
        device=config.device,
        dtype=config.dtype,
        max_tokens=config.max_tokens,
        revision=config.revision,
        matryoshka_dims=config.matryoshka_dim_list,
        served_model_name=config.served_model_name,
    )


def port_error(config: ServerConfig, field: str, reason: str) -> OSError:
    """The one-line start-up error of a port that cannot be bound: which port, and the flag that changes it."""
    what, flags = next((what, flags) for name, what, flags in PORTS if name == field)
    port = getattr(config, field)
    return OSError(f"cannot serve {what} on {config.host}:{port} ({reason}): choose another port with {flags}")


def check_ports(config: ServerConfig) -> None:
    """Answer at once, before the model loads, if a fixed port is taken. Binding itself comes after the
    load; start() gives the same error should a port be taken in between."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    for field, _, _ in PORTS:
        if not getattr(config, field):  # None: off; 0: any free port
            continue
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is free
            try:
                probe.bind((config.host, getattr(config, field)))
            except OSError as error:
                raise port_error(config, field, error.strerror or str(error)) from error


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


@dataclasses.dataclass
class EmbeddingPath:
    """The engine in the shape serve's settings ask for, with the batcher and embedder over it: what every
    door that embeds shares, the server's and the in-process ones' (Triton, the CLI, Ray) alike."""

    config: ServerConfig  # with the batch-token budget sized for the engine's device
    engine: EmbeddingEngine
    serving: ServingState
    batcher: Batcher
    embedder: TextEmbedder

    @classmethod
    def build(
        cls,
        config: ServerConfig,
        engine: EmbeddingEngine,
        *,
        metrics: Metrics | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> EmbeddingPath:
        """`on_fatal(cause)` hears a fatal failure of the batcher (see `lifecycle`); by default the path is
        only marked broken, so that its calls answer UNAVAILABLE."""
        config = dataclasses.replace(
            config, max_batch_tokens=batch_token_budget(config.max_batch_tokens, engine.model.device.type)
        )
        engine = with_buckets(engine, config)
        serving = ServingState()
        batcher = Batcher(
            engine,
            max_batch_tokens=config.max_batch_tokens,
            max_queue_tokens=config.max_queue_tokens,
            max_wait_s=config.max_wait_ms / 1000,
            metrics=metrics,
            forward_timeout_s=config.forward_timeout_s,
            on_fatal=on_fatal or serving.break_down,
        )
        return cls(config, engine, serving, batcher, TextEmbedder(engine, batcher, config, serving))

    async def start(self) -> None:
        """Start the batcher, warm the model up and take calls. Compiling layers, calls are taken once the
        eager path is warm, and the bucket lengths compile in the background, switching over as they are
        ready."""
        self.batcher.start()
        serve_early = self.engine.runner.compiler is not None
        await self.batcher.warmup(compile=not serve_early)
        self.serving.serve()
        if serve_early:
            self.batcher.compile_in_background()

    async def close(self) -> None:
        """Finish what is queued and stop the batcher's and the embedder's threads."""
        await self.batcher.close()
        self.embedder.close()


class EmbeddingServer:
    """A running scholarembed server. Build it with `create_server`."""

    def __init__(self, config: ServerConfig, engine: EmbeddingEngine) -> None:
        self.metrics = Metrics()
        self.path = EmbeddingPath.build(config, engine, metrics=self.metrics, on_fatal=self._on_fatal)
        self.config = config = self.path.config
        self.engine = engine = self.path.engine
        self.serving = self.path.serving
        self.batcher = self.path.batcher
        self.embedder = self.path.embedder
        self.health = health_aio.HealthServicer()
        tokens = config.auth_tokens()
        self.server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(tokens, open_probes=config.auth_open_probes)] if tokens else [],
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_concurrent_streams", config.max_concurrent_streams),
                # Off: its default (an experiment of gRPC's) counts a stream until the application has freed
                # it, so it refuses (REFUSED_STREAM) streams a client opened within the advertised limit.
                # Without it a client queues its streams beyond the limit, as HTTP/2 intends.
                ("grpc.http.overload_protection", 0),
                # Keepalive enforcement. The option names must be exact: gRPC ignores misspelt ones silently.
                ("grpc.http2.min_ping_interval_without_data_ms", config.keepalive_min_ping_interval_ms),
                ("grpc.http2.max_ping_strikes", 2),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.so_reuseport", 0),
            ],
        )  # No maximum_concurrent_rpcs: `CallGate` limits calls, with a retry hint and without refusing probes.
        self.credentials = server_credentials(config)
        gate = CallGate(self.serving, config.max_concurrent_rpcs, self.metrics)
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(
            EmbeddingServicer(self.embedder, config, self.metrics, gate), self.server
        )
        self.services = [EMBEDDING_SERVICE]
        self.index = open_index(config, engine.model.device, engine.matryoshka_dims)
        self.searcher: Searcher | None = None
        if self.index is not None:
            self.searcher = Searcher(self.embedder, self.index, config)
            self.metrics.watch_index(self.index)
            search_pb2_grpc.add_SearchServiceServicer_to_server(
                SearchServicer(self.searcher, config, self.metrics, gate), self.server
            )
            self.services.append(SEARCH_SERVICE)
        else:
            self.server.add_generic_rpc_handlers((search_disabled_handler(),))
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
        self._health_flip: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind, serve health (NOT_SERVING), warm up, then report SERVING. Returns the bound port."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self.credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, self.credentials)
        except RuntimeError as error:  # grpc's "Failed to bind to address", which gives no reason
            raise port_error(self.config, "port", "in use, or not allowed") from error
        await self.server.start()
        if self.http is not None:
            try:
                self.http_port = await self.http.start()
            except OSError as error:
                raise port_error(self.config, "http_port", error.strerror or str(error)) from error
        if self.config.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve_http(self.config.metrics_port, self.config.host)
            except OSError as error:
                raise port_error(self.config, "metrics_port", error.strerror or str(error)) from error
        await self.path.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.config.port_file:
            Path(self.config.port_file).write_text(str(self.port))
        log.info("%s", self.banner())
        return self.port

    def banner(self) -> str:
        """Every address the server answers on, and one command to try first."""
        host, scheme = self.config.host, "https" if self.config.tls_cert else "http"
        grpc_address = f"{host}:{self.port}"
        lines = [
            f"serving {self.engine.model_id} on {grpc_address} (metrics port {self.metrics_port})",
            f"  gRPC     {grpc_address:28} {', '.join(name.rpartition('.')[2] for name in self.services)}, "
            "health, reflection",
        ]
        if self.http_port is not None:
            http_url = f"{scheme}://{host}:{self.http_port}"
            lines.append(f"  HTTP     {http_url + '/':28} search page; /v1/embeddings, /v1/search, /docs")
        if self.metrics_port is not None:
            lines.append(f"  metrics  {scheme}://{host}:{self.metrics_port}/metrics")
        # The client commands' default server is 127.0.0.1:50051.
        server = [] if self.port == 50051 else ["--server", f"{host}:{self.port}"]
        if self.index is None:
            lines.append("  store    none (--no-index): embeddings only")
            first = ["scholarembed", "info", *server]
        else:
            collections = self.index.list_collections()
            where = self.config.index_uri or self.config.data_dir
            lines.append(f"  store    {where} ({len(collections)} collection{'' if len(collections) == 1 else 's'})")
            if collections:
                first = ["scholarembed", "search", "your question", "--collection", collections[0].name, *server]
            else:
                corpus = str(SAMPLE_CORPUS) if SAMPLE_CORPUS.exists() else "corpus.jsonl"
                first = ["scholarembed", "index", "--corpus", corpus, "--collection", "papers", *server]
        lines.append(f"  try      {shlex.join(first)}")
        return "\n".join(lines)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, let in-flight calls finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        grace = self.config.grace_s if grace is None else grace
        await asyncio.gather(self.server.stop(grace), *([self.http.stop(grace)] if self.http is not None else []))
        await self.path.close()
        if self.searcher is not None:
            await self.searcher.close()
        if self.index is not None:
            # Flushed and closed cleanly (nothing to repair on the next start), in a thread: it writes files.
            await asyncio.get_running_loop().run_in_executor(None, self.index.close)
        log.info("stopped")

    def _on_fatal(self, cause: str) -> None:
        """The batcher hit a fatal failure: say so once, and turn every door's health NOT_SERVING. The
        batcher has already failed its waiting callers and refuses new ones; `CallGate` refuses every
        other call; `serve` stops the process."""
        if not self.serving.break_down(cause):
            return
        log.critical("fatal: %s; health NOT_SERVING, exiting for a replacement", cause)
        self._health_flip = asyncio.get_running_loop().create_task(self.health.enter_graceful_shutdown())

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


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT, then drain gracefully and return 0; or until a fatal failure, then stop
    at once and return EXIT_BROKEN."""
    check_ports(config)
    server, _port = await create_server(config)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop_requested.set)
    waits = [asyncio.create_task(stop_requested.wait()), asyncio.create_task(server.serving.broken.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    if server.serving.phase is Phase.BROKEN:
        await server.stop(FATAL_GRACE_S)
    else:
        log.info("signal received: draining for up to %.1fs", config.grace_s)
        await server.stop()
    return EXIT_BROKEN if server.serving.phase is Phase.BROKEN else 0
