"""Both doors of one `scholarembed serve --http-port` process under load, overload and SIGTERM, over
loopback: bounded in count and time, and they stop by themselves. Latencies are printed (-s), never asserted."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import TINY_MATRYOSHKA, ServerProcess
from test_load import passages

from bench.http import run_mixed_load
from bench.load import print_report
from scholarembed import Client


def start(tmp_path, tiny_model_dir, *extra: str) -> ServerProcess:
    server = ServerProcess(
        tmp_path, "--model", str(tiny_model_dir), "--matryoshka-dims", TINY_MATRYOSHKA, "--http-port", "0", *extra
    )
    server.http_url = "http://127.0.0.1:" + re.search(r"HTTP door on 127\.0\.0\.1:(\d+)", server.output()).group(1)
    return server


@pytest.mark.slow
def test_50_clients_half_http_half_grpc_for_30s_see_no_errors(tmp_path, tiny_model_dir) -> None:
    server = start(tmp_path, tiny_model_dir, "--data-dir", str(tmp_path / "data"))
    try:
        with Client(server.address) as client:
            client.upsert_passages("load", passages(500))
        report = asyncio.run(run_mixed_load(server.address, server.http_url, clients=50, seconds=30, collection="load"))
    finally:
        server.stop()
    print_report(report)
    assert set(report["latency_ms"]) == {"embed", "stream", "search", "http-embed"}
    assert all(outcome.endswith(" OK") for outcome in report["outcomes"]), report["outcomes"]


def test_deliberate_overload_gives_only_429_and_resource_exhausted(tmp_path, tiny_model_dir) -> None:
    server = start(tmp_path, tiny_model_dir, "--max-queue-tokens", "300", "--max-wait-ms", "20")
    try:
        report = asyncio.run(run_mixed_load(server.address, server.http_url, clients=50, seconds=8))
    finally:
        server.stop()
    print_report(report)
    failures = {k: v for k, v in report["outcomes"].items() if not k.endswith(" OK")}
    assert "http-embed 429" in failures, "the HTTP door was not overloaded: nothing to check"
    assert set(failures) <= {"embed RESOURCE_EXHAUSTED", "http-embed 429"}, failures  # streams wait instead


def test_sigterm_drains_the_http_port_with_the_grpc_port(tmp_path, tiny_model_dir) -> None:
    server = start(tmp_path, tiny_model_dir, "--grace-s", "5")
    outcomes: list[str] = []
    stop = threading.Event()
    body = json.dumps({"input": ["protein gene cell tumor"] * 8, "input_type": "passage"}).encode()

    def caller() -> None:
        while not stop.is_set():
            request = urllib.request.Request(
                server.http_url + "/v1/embeddings", data=body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    outcomes.append(str(response.status))
            except urllib.error.HTTPError as error:
                outcomes.append(str(error.code))
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError):
                outcomes.append("no answer")  # closed or refused before answering: nothing was acknowledged
                time.sleep(0.05)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(caller) for _ in range(4)]
        deadline = time.monotonic() + 60
        while outcomes.count("200") < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
        stop.set()
        for future in futures:
            future.result(60)
    output = server.output()
    server.stop()
    assert outcomes.count("200") >= 20
    assert set(outcomes) <= {"200", "503", "no answer"}, set(outcomes)  # answered in full, or refused clearly
    assert "stopped" in output.splitlines()[-1]  # the batcher and index closed after both doors drained
