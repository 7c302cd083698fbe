"""`make bench-gpu`'s script, whole, in its CPU smoke mode: what the GPU run will do, on a tiny model.

The GPU run has one try on a borrowed machine, so every phase of the script (tokenizer, model build,
baselines, compiled buckets in-process, the server from the warm compile cache, latency and
concurrency) runs here first, with `--compile on` so the compiled branch is the one exercised, as on
CUDA. Nothing here is timed against a threshold: the figures only have to exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tiny_model import GEMMA3_TOKENIZER

REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_runs_end_to_end_in_its_cpu_smoke_mode(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "bench.throughput", "--arch", "tiny", "--random-weights", "--cpu", "--compile", "on",
        "--passages", "128", "--max-tokens", "256", "--buckets", "64,128", "--card-limit", "8",
        "--latency-queries", "10", "--clients", "4", "--concurrency-seconds", "1",
        "--work-dir", str(tmp_path / "work"), "--compile-cache-dir", str(tmp_path / "inductor"),
        "--output", str(tmp_path / "results"),
    ]  # fmt: skip
    if (GEMMA3_TOKENIZER / "tokenizer.json").exists():  # as make bench-gpu runs it (make test fetches it)
        command += ["--tokenizer", str(GEMMA3_TOKENIZER)]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=540)
    assert finished.returncode == 0, finished.stderr[-4000:]

    (report_path,) = (tmp_path / "results").glob("throughput-tiny-cpu-*.json")
    report = json.loads(report_path.read_text())
    strategies = [result["strategy"][:3] for result in report["results"]]
    assert strategies == ["(a)", "(b)", "(c)", "(c)", "(c)", "(d)", "(d)", "(e)"]
    assert all("compiled" in r["strategy"] for r in report["results"] if r["strategy"].startswith("(d)"))
    assert report["single_query"]["p99_ms"] > 0
    assert report["concurrent_queries"]["qps"] > 0
    assert {"load_s", "warmup_smaller_s", "server_start_s", "total_s"} <= report["timings_s"].keys()
    # The server waited for its bucket lengths: from the compile cache the in-process run left.
    assert "bucket lengths compiled" in (tmp_path / "results" / "server-tiny.log").read_text()
