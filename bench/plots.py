"""PNG plots of the benchmarks' JSON results, with matplotlib.

Each benchmark writes its JSON, then `save(report, json_path)` draws `<json_path>.png` beside it from that
report; `python -m bench.plots FILE.json [...]` draws them again from the files. A plot is drawn only from
a benchmark's own JSON, never from numbers typed in. The shapes read (other keys are ignored):

    throughput   bench.throughput (--cpu, --arch)  {"results": [{"strategy", "passages_per_s"}, ...]}
    doors        bench.http                        {"passages_per_s": {door: passages/s, ...}}
    latency      bench.load, bench.http --load     {"clients", "seconds",
                                                    "latency_ms": {call: {"p50", "p90", "p99"}, ...}}
    buckets      bench.buckets                     {"rows": [{"buckets", "budget", "tail", "passages",
                                                              "queries"}, ...]}
    search modes bench.search --modes              {"runs": [{"size", "<mode>_latency_ms", ...}, ...]}
                                                   for the modes dense, lexical and hybrid, and
                                                   "fts5_latency_ms" (the baseline) where measured

Each may also carry "date" and "machine", which the title shows.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

SEARCH_MODES = ("dense", "lexical", "hybrid")
PERCENTILES = ("p50", "p90", "p99")


def kind(report: dict[str, Any]) -> str | None:
    """Which of the documented shapes a report has, or None."""
    if isinstance(report.get("results"), list) and report["results"] and "strategy" in report["results"][0]:
        return "throughput"
    if isinstance(report.get("latency_ms"), dict) and report["latency_ms"]:
        return "latency"
    if isinstance(report.get("passages_per_s"), dict):
        return "doors"
    if isinstance(report.get("rows"), list) and report["rows"] and "buckets" in report["rows"][0]:
        return "buckets"
    runs = report.get("runs")
    if isinstance(runs, list) and runs and any(f"{mode}_latency_ms" in runs[0] for mode in SEARCH_MODES):
        return "search modes"
    return None


def _title(title: str, report: dict[str, Any]) -> str:
    """The plot's title, with the run's machine and date below it when the report has them."""
    run = ", ".join(str(report[key]) for key in ("machine", "date") if report.get(key))
    return "\n".join([title, *textwrap.wrap(run, 80)])


def _bars(axes: Axes, labels: list[str], values: list[float], unit: str) -> None:
    """Horizontal bars, first label on top, each with its value written at its end."""
    positions = range(len(labels))
    bars = axes.barh(list(positions), values, color="#3a5bd9")
    axes.set_yticks(list(positions), labels)
    axes.invert_yaxis()
    axes.bar_label(bars, labels=[f"{value:,.1f}" for value in values], padding=3)
    axes.set_xlabel(unit)
    axes.margins(x=0.15)


def throughput(report: dict[str, Any]) -> Figure:
    rows = report["results"]
    figure, axes = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.6), layout="constrained")
    _bars(axes, [row["strategy"] for row in rows], [row["passages_per_s"] for row in rows], "passages/s")
    device = f" ({report['device']})" if report.get("device") else ""
    figure.suptitle(_title(f"Embedding throughput per strategy{device}", report))
    return figure


def doors(report: dict[str, Any]) -> Figure:
    rates = report["passages_per_s"]
    figure, axes = plt.subplots(figsize=(9, 0.55 * len(rates) + 1.6), layout="constrained")
    _bars(axes, list(rates), list(rates.values()), "passages/s")
    figure.suptitle(_title("Bulk embedding through each door", report))
    return figure


def latency(report: dict[str, Any]) -> Figure:
    calls = sorted(report["latency_ms"])
    figure, axes = plt.subplots(figsize=(9, 4.5), layout="constrained")
    width = 0.8 / len(PERCENTILES)
    for offset, percentile in enumerate(PERCENTILES):
        values = [report["latency_ms"][call][percentile] for call in calls]
        positions = [index + (offset - 1) * width for index in range(len(calls))]
        bars = axes.bar(positions, values, width, label=percentile)
        axes.bar_label(bars, labels=[f"{value:,.0f}" for value in values], padding=2, fontsize=8)
    axes.set_xticks(range(len(calls)), calls)
    axes.set_ylabel("latency, ms")
    axes.legend(title="percentile")
    figure.suptitle(_title(f"Latency under load: {report['clients']} clients, {report['seconds']:.0f} s", report))
    return figure


def buckets(report: dict[str, Any]) -> Figure:
    # Each bucket set at its default tail (`smaller`), beside the eager planner (tail "-"), per budget.
    rows = [row for row in report["rows"] if row["tail"] in ("smaller", "-")]
    budgets = sorted({row["budget"] for row in rows})
    names = list(dict.fromkeys(row["buckets"] for row in rows))
    figure, panels = plt.subplots(
        1, len(budgets), figsize=(6 * len(budgets), 0.5 * len(names) + 2), sharey=True, layout="constrained",
        squeeze=False,
    )  # fmt: skip
    for axes, budget in zip(panels[0], budgets, strict=True):
        by_name = {row["buckets"]: row for row in rows if row["budget"] == budget}
        for offset, workload in enumerate(("passages", "queries")):
            values = [by_name[name][workload] if name in by_name else 0.0 for name in names]
            positions = [index + (offset - 0.5) * 0.4 for index in range(len(names))]
            bars = axes.barh(positions, values, 0.4, label=workload)
            axes.bar_label(bars, labels=[f"{value:.3f}" for value in values], padding=2, fontsize=8)
        axes.set_yticks(range(len(names)), names)
        axes.set_xlim(0, 1.15)
        axes.set_xlabel("padding efficiency (real / computed tokens)")
        axes.set_title(f"budget {budget:,} tokens")
    panels[0][0].invert_yaxis()
    panels[0][-1].legend(loc="upper right")
    figure.suptitle(_title("Padding efficiency per bucket set", report))
    return figure


def search_modes(report: dict[str, Any]) -> Figure:
    """One line per mode, and the FTS5 baseline's lexical search (dashed) where the run measured it, on log
    axes: the sizes span decades, and so do the modes against the baseline."""
    runs = sorted(report["runs"], key=lambda run: run["size"])
    figure, axes = plt.subplots(figsize=(8, 4.5), layout="constrained")
    sizes = [run["size"] for run in runs]
    for mode in SEARCH_MODES:
        if all(f"{mode}_latency_ms" in run for run in runs):
            axes.plot(sizes, [run[f"{mode}_latency_ms"] for run in runs], marker="o", label=mode)
    if all("fts5_latency_ms" in run for run in runs):
        latencies = [run["fts5_latency_ms"] for run in runs]
        axes.plot(sizes, latencies, marker="s", linestyle="--", color="grey", label="lexical, FTS5 (baseline)")
    if len(sizes) > 1:
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.minorticks_off()  # the sizes measured are the ticks
    axes.set_xticks(sizes, [f"{size:,}" for size in sizes])
    axes.set_xlabel("passages in the collection")
    axes.set_ylabel("one query, ms (median)")
    axes.legend(title="mode")
    axes.grid(alpha=0.3, which="both")
    figure.suptitle(_title("Search latency against collection size", report))
    return figure


PLOTS: dict[str, Callable[[dict[str, Any]], Figure]] = {
    "throughput": throughput,
    "doors": doors,
    "latency": latency,
    "buckets": buckets,
    "search modes": search_modes,
}


def save(report: dict[str, Any], json_path: Path) -> Path | None:
    """Draw the report's plot into `<json_path>.png`; returns that path, or None for a report with nothing
    to plot (e.g. bench.throughput --tokenizer-only)."""
    shape = kind(report)
    if shape is None:
        return None
    figure = PLOTS[shape](report)
    path = json_path.with_suffix(".png")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}", file=sys.stderr)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="JSON files written by the benchmarks")
    args = parser.parse_args()
    for path in args.reports:
        if save(json.loads(path.read_text()), path) is None:
            parser.error(f"{path}: not a shape bench.plots draws (see its description)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
