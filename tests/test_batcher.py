"""Batching, backpressure, cancellation and drain, on a real server whose forward pass can be held.

`HeldRunner` is the real tiny engine's runner; it only lets a test hold the forward pass at a gate, so that
"the queue is full" and "this call is in flight" are states the test controls, not races it hopes for.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from conftest import wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from reference import cosine

import scholarembed
from scholarembed import Client
from scholarembed.v1 import embedding_pb2 as pb
from scholarembed.v1 import embedding_pb2_grpc as pb_grpc
from scholarembed_server.app import EmbeddingServer
from scholarembed_server.batcher import Batcher
from scholarembed_server.config import ServerConfig
from scholarembed_server.engine import EmbeddingEngine
from scholarembed_server.errors import QueueFullError
from scholarembed_server.model.prompts import InputType


class HeldRunner:
    def __init__(self, engine: EmbeddingEngine) -> None:
        self._runner = engine.runner
        self.engine = EmbeddingEngine(engine.model, self)  # type: ignore[arg-type]  # the engine around this runner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.batches: list[list[list[int]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def launch(self, batch: Any) -> Any:
        self.batches.append([list(row) for row in batch])
        self.entered.release()
        assert self.gate.wait(60)
        return self._runner.launch(batch)

    def hold(self) -> None:
        self.gate.clear()
        while self.entered.acquire(blocking=False):
            pass


@pytest.fixture
def held(tiny_engine) -> HeldRunner:
    return HeldRunner(tiny_engine)


def token_rows(engine: Any, texts: list[str]) -> list[list[int]]:
    return [t.ids for t in engine.tokenize(texts)]


def test_batcher_returns_one_vector_per_row_in_order(tiny_engine) -> None:
    rows = token_rows(tiny_engine, ["protein", "gene expression in the brain of mice", "x", "tumor cell"])

    async def run() -> list[np.ndarray]:
        batcher = Batcher(tiny_engine, max_batch_tokens=16, max_queue_tokens=10_000)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.embed(rows[i::2], wait=False) for i in range(2)))
        finally:
            await batcher.close()

    first, second = asyncio.run(run())
    expected = np.stack([tiny_engine.runner.forward([row])[0] for row in rows])
    assert cosine(first, expected[0::2]).min() >= 0.99999
    assert cosine(second, expected[1::2]).min() >= 0.99999


def test_concurrent_requests_share_forward_passes(held) -> None:
    rows = token_rows(held.engine, [f"protein {i}" for i in range(8)])

    async def run() -> None:
        batcher = Batcher(held.engine, max_batch_tokens=4096, max_queue_tokens=10_000, max_wait_s=0.05)
        batcher.start()
        try:
            await asyncio.gather(*(batcher.embed([row], wait=False) for row in rows))
        finally:
            await batcher.close()

    asyncio.run(run())
    assert len(held.batches) < len(rows)
    assert max(len(batch) for batch in held.batches) > 1


def test_full_queue_rejects_unary_and_makes_streams_wait(held) -> None:
    rows = token_rows(held.engine, ["protein gene cell cancer tumor"] * 2)  # ~12 tokens each

    async def run() -> None:
        batcher = Batcher(held.engine, max_batch_tokens=4096, max_queue_tokens=len(rows[0]) + 1, max_wait_s=0)
        batcher.start()
        held.hold()
        first = asyncio.ensure_future(batcher.embed([rows[0]], wait=False))
        await asyncio.get_running_loop().run_in_executor(None, held.entered.acquire)
        with pytest.raises(QueueFullError):
            await batcher.embed([rows[1]], wait=False)
        waiting = asyncio.ensure_future(batcher.embed([rows[1]], wait=True))
        await asyncio.sleep(0)  # one turn: enough to refuse it or to admit it, and it must do neither
        assert not waiting.done()  # a stream waits for room instead of failing
        assert batcher.queued_tokens == len(rows[0])  # and is not admitted while there is none
        held.gate.set()
        await asyncio.wait_for(asyncio.gather(first, waiting), 30)
        assert batcher.queued_tokens == 0
        await batcher.close()

    asyncio.run(run())


def test_unary_overload_is_resource_exhausted_with_retry_hint(held, in_process_server) -> None:
    server = in_process_server(engine=held.engine, max_queue_tokens=20, max_wait_ms=0)
    held.hold()
    with Client(server.address) as client, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(client.embed_queries, ["protein"])
        assert held.entered.acquire(timeout=30)
        with pytest.raises(scholarembed.ResourceExhaustedError) as raised:
            client.embed_queries(["gene expression"])
        assert raised.value.retry_after_s and raised.value.retry_after_s > 0
        held.gate.set()
        assert in_flight.result(30).shape == (1, 64)
        assert client.embed_queries(["gene expression"]).shape == (1, 64)


def test_beyond_max_concurrent_rpcs_unary_calls_get_a_retry_hint_streams_wait_and_probes_pass(
    held, in_process_server
) -> None:
    server = in_process_server(engine=held.engine, max_concurrent_rpcs=2, max_wait_ms=0)
    gauge = server.server.metrics.registry.get_sample_value

    def stream_of(text: str) -> list[pb.EmbedStreamRequest]:
        return [pb.EmbedStreamRequest(request_id=text, request=pb.EmbedRequest(texts=[text], input_type=1))]

    held.hold()
    with grpc.insecure_channel(server.address) as channel, Client(server.address) as client:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        first = stub.Embed.future(pb.EmbedRequest(texts=["protein"], input_type=pb.INPUT_TYPE_QUERY), timeout=60)
        assert held.entered.acquire(timeout=30)  # call 1 holds the forward pass
        second = stub.EmbedStream(iter(stream_of("gene")), timeout=60)  # call 2 fills the server
        wait_for(lambda: gauge("scholarembed_calls_in_progress") == 2, message="the second call was not admitted")
        with pytest.raises(scholarembed.ResourceExhaustedError, match="2 calls in progress") as raised:
            client.embed_queries(["cell"])
        assert raised.value.retry_after_s and raised.value.retry_after_s > 0
        probe = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert probe.status == health_pb2.HealthCheckResponse.SERVING  # probes are never counted
        third = stub.EmbedStream(iter(stream_of("tumor")), timeout=60)  # a stream waits instead of failing
        wait_for(lambda: gauge("scholarembed_calls_waiting") == 1, message="the third call did not wait")
        held.gate.set()
        assert len(first.result(60).embeddings) == 1
        for stream in (second, third):
            responses = list(stream)
            assert len(responses) == 1 and not responses[0].HasField("error"), responses
    wait_for(lambda: gauge("scholarembed_calls_in_progress") == 0, message="a finished call kept its slot")


@pytest.mark.parametrize("gives_up_by", ["cancelling", "its deadline"])
def test_a_caller_that_gives_up_leaves_the_queue_without_a_forward_pass(held, in_process_server, gives_up_by) -> None:
    server = in_process_server(engine=held.engine, max_wait_ms=0)
    batcher = server.server.batcher

    def queued_texts() -> float:
        return server.server.metrics.registry.get_sample_value("scholarembed_queue_requests")

    held.hold()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        blocker = stub.Embed.future(pb.EmbedRequest(texts=["protein"], input_type=pb.INPUT_TYPE_QUERY))
        assert held.entered.acquire(timeout=30)  # the blocker holds the forward pass
        wait_for(lambda: queued_texts() == 0)
        tokens_in_flight = batcher.queued_tokens
        doomed = stub.Embed.future(
            pb.EmbedRequest(texts=["zebrafish neuron survival"], input_type=pb.INPUT_TYPE_RAW),
            timeout=5 if gives_up_by == "its deadline" else None,
        )
        # Proof that the call reached the queue first: otherwise "it never ran" would prove nothing.
        wait_for(lambda: queued_texts() == 1, message="the call never reached the batch queue")
        assert batcher.queued_tokens > tokens_in_flight
        if gives_up_by == "cancelling":
            assert doomed.cancel()
        else:
            assert doomed.exception(timeout=60).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(
            lambda: queued_texts() == 0 and batcher.queued_tokens == tokens_in_flight,
            message="the abandoned call stayed queued",
        )
        held.gate.set()
        assert len(blocker.result(timeout=30).embeddings) == 1
        abandoned_row = token_rows(held.engine, ["zebrafish neuron survival"])[0]
        assert all(abandoned_row not in batch for batch in held.batches)  # no forward pass ever saw it
        assert batcher.queued_tokens == 0
    with Client(server.address) as client:
        assert client.embed_queries(["still serving"]).shape == (1, 64)


def test_drain_is_not_serving_refuses_new_calls_and_finishes_in_flight_ones(held, in_process_server) -> None:
    server = in_process_server(engine=held.engine, max_wait_ms=0)
    with grpc.insecure_channel(server.address) as channel, ThreadPoolExecutor(2) as pool:
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.EmbeddingServiceStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        held.hold()
        in_flight = pool.submit(stub.Embed, pb.EmbedRequest(texts=["protein"], input_type=pb.INPUT_TYPE_QUERY))
        assert held.entered.acquire(timeout=30)
        stopping = pool.submit(server.run, server.server.stop(10))
        wait_for(
            lambda: server.server.health._server_status.get("") == health_pb2.HealthCheckResponse.NOT_SERVING,
            message="health never went NOT_SERVING on stop",
        )
        with pytest.raises(grpc.RpcError) as raised:
            stub.Embed(pb.EmbedRequest(texts=["late"], input_type=pb.INPUT_TYPE_QUERY), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        held.gate.set()
        assert len(in_flight.result(30).embeddings) == 1  # the acknowledged call completed
        stopping.result(30)


class WarmupHeldRunner(HeldRunner):
    """The real engine's runner, whose warm-up waits for the test to let it finish."""

    def __init__(self, engine: EmbeddingEngine) -> None:
        super().__init__(engine)
        self.warming = threading.Event()
        self.finish_warmup = threading.Event()

    def warmup(self, *, compile: bool = True) -> None:
        self.warming.set()
        assert self.finish_warmup.wait(60)
        self._runner.warmup(compile=compile)


def test_not_serving_and_unavailable_while_warm_up_runs_then_serving(tiny_engine) -> None:
    engine = WarmupHeldRunner(tiny_engine)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop)

    async def build() -> EmbeddingServer:
        return EmbeddingServer(ServerConfig(port=0), engine.engine)

    server = run(build()).result(60)
    starting = run(server.start())
    try:
        assert engine.warming.wait(60)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.EmbeddingServiceStub(channel)
            for service in ("", "scholarembed.v1.EmbeddingService"):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as raised:
                stub.Embed(pb.EmbedRequest(texts=["x"], input_type=pb.INPUT_TYPE_QUERY), timeout=30)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "warming up" in raised.value.details()
            assert rpc_status.from_call(raised.value) is not None
            assert not starting.done()
            engine.finish_warmup.set()
            assert starting.result(60) == server.port
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            assert len(stub.Embed(pb.EmbedRequest(texts=["x"], input_type=pb.INPUT_TYPE_QUERY)).embeddings) == 1
    finally:
        engine.finish_warmup.set()
        starting.result(60)
        run(server.stop(1)).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


class OutOfMemoryRunner(HeldRunner):
    """The real engine's runner, but a forward pass over more than `limit` padded tokens fails as running out
    of memory would: CUDA's OutOfMemoryError, or the CPU allocator's plain RuntimeError."""

    def __init__(self, engine: EmbeddingEngine, limit: int, error: BaseException) -> None:
        super().__init__(engine)
        self.limit = limit
        self.error = error

    def launch(self, batch: Any) -> Any:
        self.batches.append([list(row) for row in batch])
        if len(batch) * max(len(row) for row in batch) > self.limit:
            raise self.error
        return self._runner.launch(batch)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
            "to allocate 4000000000 bytes. Error code 12 (Cannot allocate memory) (injected)"
        ),
    ],
    ids=["cuda", "cpu"],
)
def test_out_of_memory_halves_the_batch_and_fails_only_what_cannot_fit(tiny_engine, in_process_server, error) -> None:
    engine = OutOfMemoryRunner(tiny_engine, limit=60, error=error)
    server = in_process_server(engine=engine.engine, max_wait_ms=50)
    short = [f"protein {i}" for i in range(12)]  # ~8 tokens each with the prompt: fit 7 at a time
    huge = " ".join(["protein gene cell"] * 30)  # ~100 tokens: cannot fit even alone
    with Client(server.address) as client, ThreadPoolExecutor(2) as pool:
        fine = pool.submit(client.embed, short, input_type="raw")
        with pytest.raises(scholarembed.ResourceExhaustedError, match="does not fit"):
            client.embed([huge], input_type="raw")
        vectors = fine.result(30).vectors
        assert cosine(vectors, tiny_engine.encode(short, InputType.RAW).vectors).min() >= 0.99999
        assert any(len(batch) < len(short) for batch in engine.batches)  # it really was split
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        assert client.embed(["still fine"], input_type="raw").vectors.shape == (1, 64)


def test_tokens_per_request_limit_and_index_size_gauge(tiny_engine, in_process_server, tmp_path) -> None:
    server = in_process_server(max_tokens_per_request=40, data_dir=str(tmp_path / "data"))
    with Client(server.address) as client:
        with pytest.raises(scholarembed.InvalidArgumentError) as raised:
            client.embed_queries(["protein gene cell"] * 5)
        assert raised.value.field_violations[0].field == "texts"
        assert client.embed_queries(["protein"]).shape == (1, 64)
        passages = [scholarembed.Passage(id=str(i), text="cell") for i in range(3)]
        client.upsert_passages("sized", passages, batch_size=1)
        gauge = server.server.metrics.registry.get_sample_value
        assert gauge("scholarembed_index_passages", {"collection": "sized"}) == 3
        client.delete_passages("sized", ["0"])
        assert gauge("scholarembed_index_passages", {"collection": "sized"}) == 2
