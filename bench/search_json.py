"""What the HTTP door's JSON costs per search: /v1/search speaks the proto3 JSON mapping (json_format), and
this measures that conversion against the whole search, in the same run.

    python -m bench.search_json [--passages 2000] [--searches 300]

For four shapes (top_k 10 and 100, ids only and with passages: 1,000-character texts and four metadata
entries), per search:
  parse   the request body to a SearchRequest (orjson, then json_format.ParseDict), as protojson.parse does;
  render  the SearchResponse to the response body (json_format.MessageToDict, then orjson), as protojson.render;
  binary  the same two messages through protobuf's binary form, which gRPC pays instead, for scale;
  search  the median end-to-end latency of POST /v1/search (httpx, one client, keep-alive) on a
          `scholarembed serve` of the tiny random model over --passages stored passages;
  gRPC    the median latency of the same search through the Search RPC (generated stub), same server.
The share is (parse + render) / search. Conversion figures are the best of five timed loops.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import orjson
from google.protobuf import json_format

from scholarembed.v1 import search_pb2 as spb
from scholarembed.v1 import search_pb2_grpc as spb_grpc
from scholarembed_server.http import protojson
from scholarembed_server.random_model import WORDS, build_tiny_embeddinggemma

TEXT = " ".join(WORDS[i % len(WORDS)] for i in range(150))[:1000]  # an abstract's length


def request_body(top_k: int, include_passages: bool) -> bytes:
    return orjson.dumps(
        {
            "collection": "bench",
            "queries": ["protein folding in the cell"],
            "top_k": top_k,
            "include_passages": include_passages,
            "mode": "SEARCH_MODE_DENSE",
        }
    )


def response(top_k: int, include_passages: bool) -> spb.SearchResponse:
    metadata = {"year": "2021", "venue": "nature", "doi": "10.1000/182", "field": "biology"}
    hits = [
        spb.Hit(id=f"passage-{i:07d}", score=0.9 - i / 1000, **({"title": "A title", "text": TEXT, "metadata": metadata}
                                                               if include_passages else {}))
        for i in range(top_k)
    ]  # fmt: skip
    return spb.SearchResponse(results=[spb.QueryResult(hits=hits)])


def best_microseconds(function: Callable[[], Any], number: int = 200) -> float:
    return min(timeit.repeat(function, number=number, repeat=5)) / number * 1e6


def median_microseconds(call: Callable[[], Any], count: int) -> float:
    for _ in range(10):  # warm-up, outside the clock
        call()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def start_server(folder: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    model = build_tiny_embeddinggemma(folder / "model")
    port_file, log = folder / "port", (folder / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "scholarembed_server", "serve", "--model", str(model), "--port", "0",
         "--port-file", str(port_file), "--http-port", "0", "--data-dir", str(folder / "data")],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (port_file.exists() and port_file.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not start:\n" + (folder / "server.log").read_text())
        time.sleep(0.1)
    http_port = re.search(r"HTTP door on [\d.]+:(\d+)", (folder / "server.log").read_text())
    assert http_port is not None
    return process, f"127.0.0.1:{port_file.read_text()}", f"http://127.0.0.1:{http_port.group(1)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=int, default=2000, help="passages stored for the end-to-end searches")
    parser.add_argument("--searches", type=int, default=300, help="timed searches per shape")
    args = parser.parse_args()

    import httpx

    from scholarembed import Client, Passage

    shapes = [(top_k, passages) for top_k in (10, 100) for passages in (False, True)]
    with tempfile.TemporaryDirectory() as folder:
        process, address, http_url = start_server(Path(folder))
        try:
            with Client(address, timeout=None) as client:
                metadata = {"year": "2021", "venue": "nature", "doi": "10.1000/182", "field": "biology"}
                client.upsert_passages(
                    "bench", [Passage(f"passage-{i:07d}", TEXT, "A title", metadata) for i in range(args.passages)]
                )
            latency, grpc_latency = {}, {}
            with httpx.Client(base_url=http_url, timeout=60) as http, grpc.insecure_channel(address) as channel:
                stub = spb_grpc.SearchServiceStub(channel)
                for shape in shapes:
                    body = request_body(*shape)
                    message = json_format.Parse(body, spb.SearchRequest())
                    latency[shape] = median_microseconds(
                        lambda body=body: http.post("/v1/search", content=body).raise_for_status(), args.searches
                    )
                    grpc_latency[shape] = median_microseconds(lambda m=message: stub.Search(m), args.searches)
        finally:
            process.terminate()
            process.wait(60)

    print(f"/v1/search JSON conversion per search; {args.passages} passages, tiny random model, CPU")
    columns = ("parse µs", "render µs", "binary µs", "search µs", "gRPC µs")
    print(f"{'top_k':>5} {'passages':>8} " + " ".join(f"{name:>10}" for name in columns) + f" {'share':>6}")
    for top_k, passages in shapes:
        body, message = request_body(top_k, passages), response(top_k, passages)
        parse = best_microseconds(lambda body=body: protojson.parse(body, spb.SearchRequest))
        render = best_microseconds(lambda message=message: protojson.render(message))
        request = json_format.Parse(body, spb.SearchRequest())
        binary = best_microseconds(
            lambda request=request, message=message: (
                spb.SearchRequest.FromString(request.SerializeToString()),
                spb.SearchResponse.FromString(message.SerializeToString()),
            )
        )
        search = latency[(top_k, passages)]
        print(
            f"{top_k:>5} {'yes' if passages else 'no':>8} {parse:10.1f} {render:10.1f} {binary:10.1f} {search:10.0f} "
            f"{grpc_latency[(top_k, passages)]:10.0f} {(parse + render) / search:6.1%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
