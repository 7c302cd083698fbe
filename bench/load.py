"""Load test: many concurrent clients mixing Embed, EmbedStream and Search against running servers.

    python -m bench.load --target 127.0.0.1:50051 --clients 50 --seconds 30 --collection scifact

Every client has its own channel and loops until the time is up (bounded in count too), one call at
a time: client i runs Embed (1-4 texts) if i % 3 == 0, EmbedStream (2 batches of 8) if 1, Search
(top 10) if 2 (Search needs --collection, else it runs Embed). It records each call's latency and
outcome. Prints a table of percentiles and error counts, and writes JSON to bench/results/.
Latencies are reported, never asserted: these machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from scholarembed import AsyncClient, ScholarEmbedError

REPO = Path(__file__).resolve().parent.parent
WORDS = "protein gene cell tumor immune response therapy outcome cohort mouse brain neuron virus drug".split()
MAX_CALLS_PER_CLIENT = 100_000


def text(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 40))))


async def one_client(
    number: int, targets: list[str], deadline: float, collection: str | None, token: str | None,
    results: dict[str, list[float]], outcomes: Counter[str],
) -> None:  # fmt: skip
    rng = np.random.default_rng(number)
    kind = ("embed", "stream", "search")[number % 3]
    if kind == "search" and not collection:
        kind = "embed"
    async with AsyncClient(targets if len(targets) > 1 else targets[0], token=token, timeout=60) as client:
        for _ in range(MAX_CALLS_PER_CLIENT):
            if time.monotonic() >= deadline:
                return
            started = time.perf_counter()
            try:
                if kind == "embed":
                    await client.embed_queries([text(rng) for _ in range(int(rng.integers(1, 5)))])
                elif kind == "stream":
                    items = [text(rng) for _ in range(16)]
                    [chunk async for chunk in client.embed_stream(items, batch_size=8, max_in_flight=2)]
                else:
                    assert collection is not None
                    await client.search(text(rng), collection=collection, top_k=10)
                outcomes[f"{kind} OK"] += 1
                results[kind].append(time.perf_counter() - started)
            except ScholarEmbedError as error:
                outcomes[f"{kind} {error.code.name}"] += 1
                await asyncio.sleep(0.05)  # a refused client backs off a little, as a real one would


async def run_load(
    targets: list[str], *, clients: int, seconds: float, collection: str | None = None, token: str | None = None
) -> dict[str, Any]:
    results: dict[str, list[float]] = defaultdict(list)
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    started = time.perf_counter()
    await asyncio.gather(
        *(one_client(n, targets, deadline, collection, token, results, outcomes) for n in range(clients))
    )
    elapsed = time.perf_counter() - started
    return latency_report(clients, elapsed, results, outcomes)


def latency_report(
    clients: int, elapsed: float, results: Mapping[str, list[float]], outcomes: Mapping[str, int]
) -> dict[str, Any]:
    """Calls, calls/s and latency percentiles (ms) per kind of call, with the outcome counts."""
    report: dict[str, Any] = {"clients": clients, "seconds": elapsed, "outcomes": dict(outcomes), "latency_ms": {}}
    for kind, latencies in results.items():
        values = np.array(latencies) * 1000
        report["latency_ms"][kind] = {
            "calls": len(values),
            "per_s": len(values) / elapsed,
            **{f"p{p}": float(np.percentile(values, p)) for p in (50, 90, 99)},
        }
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"{report['clients']} clients for {report['seconds']:.1f} s")
    print(f"{'call':8} {'calls':>7} {'per s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for kind, row in sorted(report["latency_ms"].items()):
        print(f"{kind:8} {row['calls']:7d} {row['per_s']:8.1f} {row['p50']:8.1f} {row['p90']:8.1f} {row['p99']:8.1f}")
    print("outcomes:", json.dumps(report["outcomes"], sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", required=True, help="server address; repeat for several")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--collection", help="collection for the Search clients")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    report = asyncio.run(run_load(args.target, clients=args.clients, seconds=args.seconds, collection=args.collection))
    print_report(report)
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    from bench import plots  # matplotlib, only once there is something to draw

    plots.save(report, path)


if __name__ == "__main__":
    main()
