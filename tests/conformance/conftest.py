"""The suite's servers, shared by every case: a gRPC + HTTP server with a small collection, the same with
bearer tokens on, Triton (conftest.py's, with the same limits), and a local Ray cluster, started only
when a Ray case runs. The engine is the tiny model's, loaded once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SMALL_LIMITS, TINY_MATRYOSHKA, InProcessServer
from reference import ModelCard

from scholarembed import Client, Passage

from . import adapters
from .cases import COLLECTION, MAX_TOKENS, PASSAGES, TOKEN


@pytest.fixture(scope="package")
def card(tiny_model_dir: Path) -> ModelCard:
    return ModelCard(tiny_model_dir, max_length=MAX_TOKENS)


@pytest.fixture(scope="package")
def servers(tiny_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, InProcessServer]]:
    folder = tmp_path_factory.mktemp("conformance")
    (folder / "tokens").write_text(TOKEN + "\n")
    open_server = InProcessServer(tiny_engine, http_port=0, data_dir=str(folder / "data"), **SMALL_LIMITS)
    with Client(open_server.address) as client:
        passages = [Passage(p.id, p.text, p.title, dict(p.metadata)) for p in PASSAGES]
        # float32: stored exactly, for the oracle; batches within the small limits
        client.upsert_passages(COLLECTION, passages, vector_storage="float32", batch_size=4)
    guarded = InProcessServer(tiny_engine, http_port=0, auth_token_file=str(folder / "tokens"), **SMALL_LIMITS)
    yield {"open": open_server, "guarded": guarded}
    guarded.stop()
    open_server.stop()


class Adapters:
    """The adapter of each door, made on first use (a door's client, Triton, Ray start only if needed)."""

    def __init__(self, work: Path) -> None:
        self._work = work
        self._made: dict[str, adapters.Adapter] = {}
        self.ray_started = False

    def get(self, name: str, request: pytest.FixtureRequest) -> adapters.Adapter:
        """The door's adapter; `request` (the test's) provides the servers it needs."""
        if name not in self._made:
            self._made[name] = self._make(name, request)
        return self._made[name]

    def _make(self, name: str, request: pytest.FixtureRequest) -> adapters.Adapter:
        fixture = request.getfixturevalue
        if name in ("triton", "client-triton"):
            address = fixture("triton").grpc_address
            return adapters.TritonRaw(address) if name == "triton" else adapters.ClientTriton(address)
        model_dir = str(fixture("tiny_model_dir"))
        if name == "cli":
            return adapters.Cli(name, self._folder(name), ["--model", model_dir, "--matryoshka-dims", TINY_MATRYOSHKA])
        if name == "ray":
            from scholarembed_server.config import ServerConfig

            self._start_ray()
            return adapters.Ray(self._folder(name), ServerConfig(model=model_dir, matryoshka_dims=TINY_MATRYOSHKA))
        servers = fixture("servers")
        open_server, guarded = servers["open"], servers["guarded"]
        urls = [f"http://127.0.0.1:{server.server.http_port}" for server in (open_server, guarded)]
        model = open_server.server.engine.model_id
        made: dict[str, Any] = {
            "grpc": lambda: adapters.GrpcStubs(open_server.address, guarded.address),
            "http-openai": lambda: adapters.OpenAiSdk(*urls, model),
            "http-json": lambda: adapters.HttpJson(*urls, model),
            "client-grpc": lambda: adapters.ClientGrpc(open_server.address, guarded.address),
            "cli-server": lambda: adapters.Cli(name, self._folder(name), ["--server", open_server.address]),
        }
        return made[name]()

    def _folder(self, name: str) -> Path:
        folder = self._work / name
        folder.mkdir()
        return folder

    def _start_ray(self) -> None:
        import ray

        os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default, 15, starves actors on a shared machine
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        self.ray_started = True


@pytest.fixture(scope="package")
def doors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Adapters]:
    made = Adapters(tmp_path_factory.mktemp("doors"))
    yield made
    if made.ray_started:  # test_ray.py starts a cluster of its own
        import ray

        ray.shutdown()
