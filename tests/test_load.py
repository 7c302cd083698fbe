"""Load, overload and faults over loopback: bounded in count and time, and they stop by themselves.

Latency percentiles are printed (run with -s to see them), never asserted.
"""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import TINY_MATRYOSHKA, ServerProcess, wait_for
from tiny_model import WORDS

import scholarembed
from bench.load import print_report, run_load
from scholarembed import Client, Passage
from scholarembed.v1 import embedding_pb2 as pb
from scholarembed.v1 import embedding_pb2_grpc as pb_grpc


def tiny_args(tiny_model_dir, *extra: str) -> tuple[str, ...]:
    return ("--model", str(tiny_model_dir), "--matryoshka-dims", TINY_MATRYOSHKA, *extra)


def passages(count: int, prefix: str = "p") -> list[Passage]:
    return [Passage(id=f"{prefix}{i}", text=" ".join(WORDS[i % 50 : i % 50 + 12])) for i in range(count)]


def metric(address: str, name: str) -> float:
    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    return float(re.search(rf"^{name} (\S+)$", body, re.MULTILINE).group(1))


def test_50_clients_mixing_embed_stream_and_search_for_30s_see_no_errors(tmp_path, tiny_model_dir) -> None:
    server = ServerProcess(tmp_path, *tiny_args(tiny_model_dir, "--data-dir", str(tmp_path / "data")))
    try:
        with Client(server.address) as client:
            client.upsert_passages("load", passages(500))
        report = asyncio.run(run_load([server.address], clients=50, seconds=30, collection="load"))
    finally:
        server.stop()
    print_report(report)
    assert set(report["latency_ms"]) == {"embed", "stream", "search"}
    assert all(outcome.endswith(" OK") for outcome in report["outcomes"]), report["outcomes"]


def test_deliberate_overload_gives_only_resource_exhausted_and_streams_never_fail(tmp_path, tiny_model_dir) -> None:
    server = ServerProcess(tmp_path, *tiny_args(tiny_model_dir, "--max-queue-tokens", "300", "--max-wait-ms", "20"))
    try:
        report = asyncio.run(run_load([server.address], clients=50, seconds=8))
    finally:
        server.stop()
    print_report(report)
    failures = {k: v for k, v in report["outcomes"].items() if not k.endswith(" OK")}
    assert failures, "the server was not overloaded: nothing to check"
    assert set(failures) <= {"embed RESOURCE_EXHAUSTED"}, failures  # streams wait instead of failing


def test_a_thousand_streams_on_one_channel_all_complete(tmp_path, tiny_model_dir) -> None:
    """One grpc.aio channel (stubs generated from protos/ only) multiplexing 1000 EmbedStream calls, ten
    times a connection's 100 concurrent streams: the client queues the rest, none is refused."""
    server = ServerProcess(tmp_path, *tiny_args(tiny_model_dir))
    requests_per_stream = 3

    async def stream(stub: pb_grpc.EmbeddingServiceStub, number: int) -> str:
        async def requests():
            for i in range(requests_per_stream):
                request = pb.EmbedRequest(texts=[f"{WORDS[(number + i) % 50]} {number}"], input_type=1)
                yield pb.EmbedStreamRequest(request_id=f"{number}/{i}", request=request)

        try:
            responses = [response async for response in stub.EmbedStream(requests(), timeout=300)]
        except grpc.aio.AioRpcError as error:
            return f"{error.code().name}: {error.details()}"
        if [r.request_id for r in responses] != [f"{number}/{i}" for i in range(requests_per_stream)]:
            return f"answered {[r.request_id for r in responses]}"
        return next((f"in-band {r.error.code}: {r.error.message}" for r in responses if r.HasField("error")), "OK")

    async def run() -> Counter[str]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            return Counter(await asyncio.gather(*(stream(stub, number) for number in range(1000))))

    try:
        outcomes = asyncio.run(run())
    finally:
        server.stop()
    assert outcomes == {"OK": 1000}, outcomes


def test_sigterm_under_load_loses_no_acknowledged_call(tmp_path, tiny_model_dir) -> None:
    args = tiny_args(tiny_model_dir, "--data-dir", str(tmp_path / "data"), "--grace-s", "5")
    server = ServerProcess(tmp_path, *args)
    acked: list[str] = []
    unary_outcomes: list[str] = []
    stop = threading.Event()

    def ingest() -> None:
        with Client(server.address) as client, pytest.raises(scholarembed.ScholarEmbedError):
            for ack in client.upsert_stream("drain", passages(100_000), batch_size=20, max_in_flight=4):
                acked.extend(ack.ids)

    def queries() -> None:
        # A generous deadline: the server drains within --grace-s 5, so only a hung server reaches it.
        with Client(server.address, timeout=60) as client:
            while not stop.is_set():
                try:
                    client.embed_queries(["protein gene"])
                    unary_outcomes.append("OK")
                except scholarembed.ScholarEmbedError as error:
                    unary_outcomes.append(error.code.name)
                    time.sleep(0.05)

    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(ingest)] + [pool.submit(queries) for _ in range(4)]
        try:
            wait_for(lambda: len(acked) >= 200 or futures[0].done(), timeout=120, message="ingestion never started")
            assert not futures[0].done(), futures[0].exception()
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(60) == 0
        finally:
            stop.set()
            server.stop()
        for future in futures:
            future.result(120)
    assert set(unary_outcomes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, set(unary_outcomes)

    server = ServerProcess(tmp_path, *args)
    try:
        with Client(server.address) as client:
            stored = {
                p.id for i in range(0, len(acked), 5000) for p in client.get_passages("drain", acked[i : i + 5000])
            }
            assert stored == set(acked)  # every acknowledged upsert survived the drain
    finally:
        server.stop()


def test_round_robin_over_three_servers_survives_one_killed_mid_run(tmp_path, tiny_model_dir) -> None:
    with ThreadPoolExecutor(3) as pool:
        servers = list(pool.map(lambda n: ServerProcess(tmp_path / str(n), *tiny_args(tiny_model_dir)), range(3)))
    calls: list[str] = []
    stop = threading.Event()

    def caller() -> None:
        with Client([s.address for s in servers], timeout=60) as client:
            while not stop.is_set():
                try:
                    client.embed_queries(["protein gene cell"])
                    calls.append("OK")
                except scholarembed.ScholarEmbedError as error:
                    calls.append(error.code.name)

    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(caller) for _ in range(6)]
            try:
                wait_for(lambda: len(calls) >= 60, timeout=120, message="the callers made no progress")
                servers[1].process.send_signal(signal.SIGKILL)
                servers[1].process.wait(30)
                before_kill = len(calls)
                wait_for(lambda: len(calls) >= before_kill + 120, timeout=120, message="no calls after the kill")
            finally:
                stop.set()
            for future in futures:
                future.result(120)
    finally:
        for server in servers:
            server.stop()
    assert len(calls) > before_kill > 0
    assert set(calls) == {"OK"}, {c for c in calls if c != "OK"}


@pytest.fixture
def metered_server(tmp_path, tiny_model_dir):
    server = ServerProcess(tmp_path, *tiny_args(tiny_model_dir, "--metrics-port", "0", "--stream-window", "4"))
    port = re.search(r"metrics port (\d+)", server.output()).group(1)
    server.metrics_address = f"127.0.0.1:{port}"
    yield server
    server.stop()


def test_client_cancelling_mid_stream_leaves_nothing_queued(metered_server) -> None:
    texts = [" ".join(WORDS[i % 40 : i % 40 + 30]) for i in range(5000)]
    with Client(metered_server.address) as client:
        stream = client.embed_stream(texts, batch_size=32, max_in_flight=8)
        next(stream)
        next(stream)
        stream.close()  # cancels the call
        wait_for(
            lambda: metric(metered_server.metrics_address, "scholarembed_queue_tokens") == 0,
            message="cancelled work stayed queued",
        )
        assert client.embed_queries(["still serving"]).shape == (1, 64)


def test_slow_reader_is_held_back_by_flow_control_and_others_are_served(metered_server) -> None:
    request = pb.EmbedRequest(texts=[" ".join(WORDS[:30])] * 16, input_type=pb.INPUT_TYPE_PASSAGE)
    sent = 0

    def requests():
        nonlocal sent
        for number in range(2000):
            sent += 1
            yield pb.EmbedStreamRequest(request_id=str(number), request=request)

    with grpc.insecure_channel(metered_server.address) as channel, Client(metered_server.address) as other:
        responses = pb_grpc.EmbeddingServiceStub(channel).EmbedStream(requests())
        for _ in range(5):
            next(responses)
            time.sleep(0.3)  # a slow reader
            assert other.embed_queries(["protein"]).shape == (1, 64)  # others are still served (60 s deadline)
        queued = metric(metered_server.metrics_address, "scholarembed_queue_requests")
        assert queued <= 4 * 16  # at most the stream window's worth of texts waits in the server
        assert sent < 2000  # the unread stream pushed back on its sender
        responses.cancel()
