"""Each benchmark draws its PNG plot from the JSON it writes: small real runs of bench.search --modes and
bench.load, then `python -m bench.plots` on their JSON. (bench.throughput draws in test_bench_gpu_smoke's run;
the figures for the documentation come from quiet, full-size runs.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, env=environment, cwd=REPO,
        check=True,
    )  # fmt: skip


def the_plot_of(output: Path, prefix: str) -> tuple[dict, Path]:
    [report] = output.glob(f"{prefix}-*.json")
    plot = report.with_suffix(".png")
    assert plot.exists(), f"{report.name} has no plot beside it"
    image = np.asarray(Image.open(plot).convert("L"))
    assert image.shape[0] >= 300 and image.shape[1] >= 600
    assert image.std() > 10  # something is drawn on the white
    return json.loads(report.read_text()), plot


def test_bench_search_modes_plots_latency_against_size_from_its_json(tmp_path) -> None:
    run_bench("bench.search", "--modes", "--kinds", "", "--sizes", "400,800", "--output", str(tmp_path))
    report, plot = the_plot_of(tmp_path, "search-modes-cpu")
    assert [run["size"] for run in report["runs"]] == [400, 800]
    drawn_at = plot.stat().st_mtime_ns
    redrawn = run_bench("bench.plots", str(plot.with_suffix(".json")))
    assert f"wrote {plot}" in redrawn.stderr and plot.stat().st_mtime_ns >= drawn_at


def test_bench_load_plots_its_latency_percentiles(tmp_path, tiny_server) -> None:
    run_bench("bench.load", "--target", tiny_server.address, "--clients", "3", "--seconds", "2",
              "--output", str(tmp_path))  # fmt: skip
    report, _ = the_plot_of(tmp_path, "load")
    assert report["latency_ms"] and all("p99" in row for row in report["latency_ms"].values())


def test_a_file_that_is_no_benchmark_report_is_refused(tmp_path) -> None:
    stray = tmp_path / "stray.json"
    stray.write_text(json.dumps({"hello": "world"}))
    result = subprocess.run([sys.executable, "-m", "bench.plots", str(stray)], capture_output=True, text=True,
                            cwd=REPO, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "not a shape bench.plots draws" in result.stderr
    assert not stray.with_suffix(".png").exists()
