"""Supervision, over real sockets: faults injected where the batcher plans a round, runs a forward pass, waits
for its vectors and hands them out (tests/faults.py), and fatal ones: a poisoned CUDA context, a forward
pass that never returns, the worker dying.

Every call has a generous deadline that only a hang could reach, and then it fails with the wrong code:
no test waits for a deadline to find a hang. After a non-fatal fault the next request succeeds; after a
fatal one health flips on both doors, and `scholarembed serve` exits with EXIT_BROKEN.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from conftest import TINY_MATRYOSHKA, ServerProcess, wait_for
from faults import FAULTS, FaultyEngine, device_error
from grpc_health.v1 import health_pb2, health_pb2_grpc
from reference import cosine
from tiny_model import WORDS

from scholarembed.v1 import embedding_pb2 as pb
from scholarembed.v1 import embedding_pb2_grpc as pb_grpc
from scholarembed.v1 import search_pb2, search_pb2_grpc
from scholarembed_server.batcher import Batcher
from scholarembed_server.engine import EmbeddingEngine
from scholarembed_server.errors import ServerBrokenError
from scholarembed_server.lifecycle import EXIT_BROKEN, is_fatal
from scholarembed_server.model.buckets import LengthBuckets
from scholarembed_server.model.prompts import InputType

DEADLINE_S = 60
ORACLE = 0.99999
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SHORT = "protein"  # with a fault's marker and the query prompt: the 64-token bucket
LONG = " ".join(WORDS[:20])  # the 128-token bucket: never in the same batch as a short text


def query(*texts: str) -> pb.EmbedRequest:
    return pb.EmbedRequest(texts=list(texts), input_type=pb.INPUT_TYPE_QUERY)


def vectors(response: pb.EmbedResponse) -> np.ndarray:
    return np.stack([np.frombuffer(e.data, dtype="<f4") for e in response.embeddings])


def health(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status


@pytest.fixture
def faulty(tiny_engine: Any) -> FaultyEngine:
    buckets = LengthBuckets.create("32,64", max_tokens=tiny_engine.max_tokens, max_batch_tokens=512)
    prompted = tiny_engine.prompts.apply([f"FAULT:{fault} {SHORT}" for fault in FAULTS] + [LONG], InputType.QUERY)
    *short, long = [buckets.length_for(len(t.ids)) for t in tiny_engine.tokenize(prompted)]
    assert long not in short, "the faulty texts and LONG must fall in different buckets"
    return FaultyEngine(tiny_engine.with_buckets(buckets))


def test_only_sticky_cuda_errors_are_fatal() -> None:
    assert is_fatal(device_error())
    assert is_fatal(RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"))
    assert is_fatal(RuntimeError("CUDA error: device-side assert triggered"))
    out_of_memory = torch.AcceleratorError("CUDA error: out of memory")
    out_of_memory.error_code = 2  # type: ignore[attr-defined]  # cudaErrorMemoryAllocation: the batch is split
    assert not is_fatal(out_of_memory)
    assert not is_fatal(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_fatal(RuntimeError("misaligned address in my own parser"))  # CUDA's words, not CUDA's error
    assert not is_fatal(ValueError("bad input"))


@pytest.mark.parametrize("stage", ["launch", "wait", "deliver"])
def test_a_failed_batch_fails_only_its_callers_and_the_worker_goes_on(faulty, in_process_server, tiny_engine, stage):
    server = in_process_server(engine=faulty, max_wait_ms=20)  # a burst of two calls: one round, two batches
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        failing = stub.Embed.future(query(f"FAULT:{stage} {SHORT}"), timeout=DEADLINE_S)
        served = stub.Embed.future(query(LONG), timeout=DEADLINE_S)
        error = failing.exception()
        assert error is not None and error.code() == grpc.StatusCode.INTERNAL, error
        expected = tiny_engine.encode([LONG], InputType.QUERY).vectors
        assert cosine(vectors(served.result()), expected).min() >= ORACLE
        assert len(stub.Embed(query(SHORT), timeout=DEADLINE_S).embeddings) == 1  # the next request succeeds
        assert health(channel) == SERVING


def test_a_failed_plan_fails_its_round_and_the_next_round_runs(faulty, in_process_server) -> None:
    server = in_process_server(engine=faulty)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Embed(query(f"FAULT:plan {SHORT}"), timeout=DEADLINE_S)
        assert raised.value.code() == grpc.StatusCode.INTERNAL
        assert len(stub.Embed(query(SHORT, LONG), timeout=DEADLINE_S).embeddings) == 2
        assert health(channel) == SERVING


def test_a_failed_request_of_a_stream_is_answered_in_band_and_the_stream_goes_on(faulty, in_process_server) -> None:
    server = in_process_server(engine=faulty)
    texts = [SHORT, f"FAULT:wait {SHORT}", LONG, f"FAULT:deliver {LONG}", SHORT]
    requests = [pb.EmbedStreamRequest(request_id=str(i), request=query(text)) for i, text in enumerate(texts)]
    with grpc.insecure_channel(server.address) as channel:
        responses = list(pb_grpc.EmbeddingServiceStub(channel).EmbedStream(iter(requests), timeout=DEADLINE_S))
    assert [r.request_id for r in responses] == ["0", "1", "2", "3", "4"]
    internal = grpc.StatusCode.INTERNAL.value[0]
    assert [r.error.code for r in responses] == [0, internal, 0, internal, 0]
    assert all(len(r.response.embeddings) == 1 for r in responses if not r.HasField("error"))


def http_get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=DEADLINE_S) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_poisoned_device_fails_every_waiting_caller_at_once_and_flips_health_on_both_doors(
    faulty, in_process_server, tmp_path, caplog
) -> None:
    faulty.hold_device_fault = True
    server = in_process_server(engine=faulty, max_wait_ms=0, http_port=0, data_dir=str(tmp_path / "data"))
    http_port = server.server.http_port
    assert http_get(http_port, "/health/ready")[0] == 200

    def queued_texts() -> float:
        return server.server.metrics.registry.get_sample_value("scholarembed_queue_requests")

    with grpc.insecure_channel(server.address) as channel, caplog.at_level(logging.INFO):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        striking = stub.Embed.future(query(f"FAULT:device {SHORT}"), timeout=DEADLINE_S)
        assert faulty.device_fault_reached.wait(DEADLINE_S)  # the forward pass that breaks the device is running
        waiting = [stub.Embed.future(query(f"{SHORT} {i}"), timeout=DEADLINE_S) for i in range(3)]
        stream_requests = [pb.EmbedStreamRequest(request_id=str(i), request=query(LONG)) for i in range(2)]
        stream = stub.EmbedStream(iter(stream_requests), timeout=DEADLINE_S)
        wait_for(lambda: queued_texts() == 5, message="the callers never queued behind the failing batch")
        faulty.release_device_fault.set()

        for call in [striking, *waiting]:
            error = call.exception()
            assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert "server is broken" in error.details() and "illegal memory access" in error.details()
        in_band = [response.error for response in stream]
        assert [status.code for status in in_band] == [grpc.StatusCode.UNAVAILABLE.value[0]] * 2

        for service in ("", "scholarembed.v1.EmbeddingService", "scholarembed.v1.SearchService"):
            wait_for(lambda service=service: health(channel, service) == NOT_SERVING, message=f"{service!r} health")
        for path in ("/health", "/health/ready"):
            status, body = http_get(http_port, path)
            assert status == 503 and "illegal memory access" in body["error"]["message"], (path, body)

        with pytest.raises(grpc.RpcError) as raised:
            stub.Embed(query(SHORT), timeout=DEADLINE_S)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as raised:  # calls that need no model are refused too
            search_pb2_grpc.SearchServiceStub(channel).ListCollections(
                search_pb2.ListCollectionsRequest(), timeout=DEADLINE_S
            )
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    fatal = [record for record in caplog.records if record.levelno == logging.CRITICAL]
    assert len(fatal) == 1 and "illegal memory access" in fatal[0].getMessage(), caplog.text


def test_a_crash_of_the_worker_loop_itself_is_fatal_not_silent(tiny_engine) -> None:
    rows = [t.ids for t in tiny_engine.tokenize(["protein", "gene"])]
    causes: list[str] = []

    async def crash() -> list[Any]:
        raise RuntimeError("injected crash outside any round")

    async def run() -> None:
        batcher = Batcher(tiny_engine, max_batch_tokens=256, max_queue_tokens=10_000, on_fatal=causes.append)
        batcher._next_round = crash  # type: ignore[method-assign]  # the loop's own code failing
        batcher.start()
        with pytest.raises(ServerBrokenError, match="worker task died"):
            await asyncio.wait_for(batcher.embed(rows, wait=False), DEADLINE_S)
        with pytest.raises(ServerBrokenError):  # refused at once from now on
            await batcher.embed(rows, wait=True)
        await asyncio.wait_for(batcher.close(), DEADLINE_S)

    asyncio.run(run())
    assert len(causes) == 1 and "injected crash outside any round" in causes[0]


class WarmupHeld:
    """The real engine's runner, whose warm-up (in the model thread) waits until released."""

    def __init__(self, engine: EmbeddingEngine) -> None:
        self._runner = engine.runner
        self.engine = EmbeddingEngine(engine.model, self)  # type: ignore[arg-type]  # the engine around this runner
        self.warming = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def warmup(self, *, compile: bool = True) -> None:
        self.warming.set()
        assert self.release.wait(DEADLINE_S)


def test_closing_waits_for_a_busy_model_thread_without_blocking_the_event_loop(tiny_engine) -> None:
    engine = WarmupHeld(tiny_engine)
    released_by: list[str] = []

    def release(by: str) -> None:
        if not engine.release.is_set():
            released_by.append(by)
            engine.release.set()

    async def run() -> None:
        batcher = Batcher(engine.engine, max_batch_tokens=256, max_queue_tokens=10_000)
        batcher.start()
        warming = asyncio.ensure_future(batcher.warmup())
        await asyncio.get_running_loop().run_in_executor(None, engine.warming.wait, DEADLINE_S)
        closing = asyncio.ensure_future(batcher.close())
        # Only a loop blocked by close() leaves the release to this timer: then the loop runs again only
        # after the thread is free, and the turns below come too late.
        safety = threading.Timer(DEADLINE_S / 2, release, ("the timer",))
        safety.start()
        for _ in range(100):  # the loop keeps turning while close() waits for the model thread
            await asyncio.sleep(0)
        assert not closing.done()
        release("the event loop")
        await asyncio.wait_for(asyncio.gather(warming, closing), DEADLINE_S)
        safety.cancel()

    asyncio.run(run())
    assert released_by == ["the event loop"]


FAULT_SERVER = str(Path(__file__).parent / "faults.py")


@pytest.mark.parametrize(
    ("fault", "cause"),
    [("device", "illegal memory access"), ("hang", "has not returned from a forward pass in 2s")],
)
def test_a_fatal_failure_turns_health_not_serving_and_the_process_exits_non_zero(
    tmp_path, tiny_model_dir, fault, cause
) -> None:
    server = ServerProcess(
        tmp_path,
        "--model", str(tiny_model_dir), "--matryoshka-dims", TINY_MATRYOSHKA, "--buckets", "16,32",
        "--forward-timeout-s", "2",
        program=[FAULT_SERVER],
    )  # fmt: skip
    try:
        with grpc.insecure_channel(server.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
            assert next(watch).status == SERVING
            with pytest.raises(grpc.RpcError) as raised:
                pb_grpc.EmbeddingServiceStub(channel).Embed(query(f"FAULT:{fault} {SHORT}"), timeout=DEADLINE_S)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert cause in raised.value.details()
            assert next(watch).status == NOT_SERVING
        assert server.process.wait(DEADLINE_S) == EXIT_BROKEN
        output = server.output()
        fatal = [line for line in output.splitlines() if "fatal:" in line]
        assert len(fatal) == 1 and cause in fatal[0], output
        assert "Traceback" not in output, output
    finally:
        server.stop()
