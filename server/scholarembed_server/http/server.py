"""uvicorn serving the HTTP door inside the running event loop, beside grpc.aio.

The process owns the lifecycle: `EmbeddingServer` starts the door after the gRPC port is bound (so
/health/live answers during warm-up) and stops it together with gRPC on SIGTERM. That is why uvicorn's
own signal handling is switched off, and why the app needs no lifespan: the engine, batcher and index
it uses belong to the process, not to the door.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator

import uvicorn

from ..config import ServerConfig
from ..embedder import TextEmbedder
from ..metrics import Metrics
from ..searcher import Searcher
from .app import DoorState, create_app

log = logging.getLogger(__name__)


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # SIGTERM drains both doors together (app.serve); uvicorn must not catch it and leave alone.
        yield


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, created with its protocol named: asyncio sets TCP_NODELAY only on
    connections whose socket says IPPROTO_TCP, and socket.create_server's says 0. Without it, a response
    written in two parts (uvicorn writes the head, then the body) waits for the client's delayed ACK:
    about 40 ms on every request of a kept-alive connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        listener.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as create_server: restart on a port in TIME_WAIT
        listener.bind((host, port))
    except OSError:
        listener.close()
        raise
    return listener


class HttpDoor:
    """The HTTP door of one server process: `start()` binds and serves, `stop(grace)` drains."""

    def __init__(
        self, config: ServerConfig, embedder: TextEmbedder, searcher: Searcher | None, metrics: Metrics
    ) -> None:
        self._config = config
        self._state = DoorState()
        self.app = create_app(config, embedder, searcher, metrics, self._state)
        client_ca = config.tls_client_ca
        self._server = _InLoopServer(
            uvicorn.Config(
                self.app,
                lifespan="off",
                log_config=None,  # keep the process's logging (text or JSON, with request ids)
                access_log=False,  # each call is logged and timed by the metrics middleware
                timeout_graceful_shutdown=config.grace_s,  # type: ignore[arg-type]  # a float works
                ssl_certfile=config.tls_cert,
                ssl_keyfile=config.tls_key,
                ssl_ca_certs=client_ca,
                ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca else ssl.CERT_NONE,
            )
        )
        self._socket: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind --host:--http-port and serve; returns the bound port (useful with --http-port 0)."""
        host, port = self._config.host, self._config.http_port or 0
        if (self._config.tls_cert is None) != (self._config.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        self._socket = listening_socket(host, port)
        bound = int(self._socket.getsockname()[1])
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="http-door")
        while not self._server.started:  # startup is a few milliseconds: the socket is already bound
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP door stopped during start-up")
            await asyncio.sleep(0.01)
        log.info("HTTP door on %s:%d (%s)", host, bound, "https" if self._config.tls_cert else "http")
        return bound

    @property
    def draining(self) -> bool:
        return self._state.draining

    @property
    def calls_in_progress(self) -> int:
        """Calls whose request has arrived (headers read) and whose response is not finished."""
        return len(self._server.server_state.tasks)

    async def stop(self, grace: float) -> None:
        """Refuse new calls (503), stop listening, let in-flight calls finish within `grace` seconds."""
        self._state.draining = True
        if self._task is None:
            return
        log.info("HTTP door draining: %d calls in progress, %.1fs to finish", self.calls_in_progress, grace)
        self._server.config.timeout_graceful_shutdown = max(0.0, grace)  # type: ignore[assignment]
        self._server.should_exit = True
        await self._task
