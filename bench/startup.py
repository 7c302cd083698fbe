"""Start-up with --compile on: the former design (the whole forward compiled per static shape) against
the new one (the repeated layer compiled per bucket length, rows dynamic, served early), in one run.

    python -m bench.startup                      # EmbeddingGemma-300m's architecture, random weights, CPU
    python -m bench.startup --arch tiny          # the same code on a tiny model, a smoke test

Each phase runs in its own process, on a compile cache of its own:
  old     bench.whole_model (the whole forward per shape) on --old-shapes shapes of the defaults (51 shapes at 16,384
          tokens, 63 at 65,536), timed one by one; the other shapes are extrapolated from their mean;
  new     the server's regional compilation on the first --new-lengths (default: all) of the 12 bucket lengths, timed
          one by one (any not measured extrapolated likewise); graphs counted by dynamo;
  warm    the same lengths again in a fresh process, from the compile cache `new` left;
  serve   `scholarembed serve --compile on` at the defaults: seconds until SERVING (it serves eagerly
          while the lengths compile);
  speed   at the fullest shape of the 256-token bucket, the median steady forward of each compiled design
          and of eager (the new design must stay within 10% of the whole-model compile).
Graph counts are exact (tests/test_startup.py asserts them at the defaults); seconds are this machine's.
CPU inductor writes C++, GPU inductor Triton: the counts and ratios carry over, the seconds do not.
Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SHAPE_BUDGETS = (16384, 65536)  # the CPU and the CUDA default of --max-batch-tokens
TABLE_COLUMNS = ("budget", "shapes", "new_graphs", "old_compile_s", "new_compile_s", "old_serving_s")


def build_model(work_dir: Path, arch: str) -> Path:
    from bench.throughput import ARCHS
    from scholarembed_server.random_model import build_random_embeddinggemma, build_tokenizer

    folder = work_dir / f"{arch}-random-startup"
    if not (folder / "config.json").exists():
        build_tokenizer(work_dir / "startup-tokenizer")  # the vocabulary's size does not change what compiles
        build_random_embeddinggemma(folder, tokenizer_folder=work_dir / "startup-tokenizer", **ARCHS[arch])
    return folder


SPEED_LENGTH = 256  # where the compiled forwards are timed: an abstract's length (SciFact's mean is 316 tokens)


def speed_shape(buckets: Any) -> tuple[int, int]:
    """The fullest shape of the SPEED_LENGTH bucket: the same static shape for both compiled designs."""
    return max(shape for shape in buckets.shapes() if shape[1] == SPEED_LENGTH)


def steady_seconds(forward: Any, repeats: int = 5) -> float:
    """Median seconds of one compiled forward, after its compilation (the first call, not timed)."""
    forward()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        forward()
        seconds.append(time.perf_counter() - started)
    return sorted(seconds)[len(seconds) // 2]


def old_phase(model_dir: Path, device: str, shapes: int, budget: int) -> dict[str, Any]:
    """The whole forward compiled for `shapes` shapes of the defaults, one by one, the speed shape first."""
    from bench.whole_model import WholeModelCompiled
    from scholarembed_server.engine import EmbeddingEngine
    from scholarembed_server.model.buckets import LengthBuckets
    from scholarembed_server.model.compilation import graphs_compiled, use_compile_cache

    use_compile_cache(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    engine = EmbeddingEngine.load(str(model_dir), device=device)
    buckets = LengthBuckets.create(None, max_tokens=engine.max_tokens, max_batch_tokens=budget)
    whole = WholeModelCompiled(engine.model, buckets)
    short = engine.tokenize(["warmup"])[0].ids
    timed_shape = speed_shape(buckets)
    measured = [timed_shape, *(shape for shape in buckets.shapes() if shape != timed_shape)][:shapes]
    seconds = []
    for rows, length in measured:
        started = time.perf_counter()
        whole.launch([(short * length)[:length]] * rows)
        seconds.append(time.perf_counter() - started)
        print(f"old design: shape {rows} x {length} compiled in {seconds[-1]:.1f}s", file=sys.stderr)
    rows, length = timed_shape
    batch = [(short * length)[:length]] * rows
    return {
        "shapes": measured,
        "seconds": seconds,
        "graphs": graphs_compiled(),
        "speed_shape": timed_shape,
        "compiled_forward_s": steady_seconds(lambda: whole.launch(batch)),
        "eager_forward_s": steady_seconds(lambda: engine.runner.forward(batch)),
    }


def new_phase(model_dir: Path, device: str, lengths: int, budget: int) -> dict[str, Any]:
    """The repeated layer compiled for the first `lengths` bucket lengths of the defaults, one by one."""
    from scholarembed_server.engine import EmbeddingEngine
    from scholarembed_server.model.buckets import LengthBuckets
    from scholarembed_server.model.compilation import fx_graph_cache_counts, graphs_compiled, use_compile_cache

    use_compile_cache(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    engine = EmbeddingEngine.load(str(model_dir), device=device)
    buckets = LengthBuckets.create(None, max_tokens=engine.max_tokens, max_batch_tokens=budget)
    layers = engine.with_buckets(buckets, compile_mode="default").runner
    chosen = buckets.lengths[:lengths] if lengths else buckets.lengths
    seconds = []
    for length in chosen:
        started = time.perf_counter()
        layers.compile_length(length)
        seconds.append(time.perf_counter() - started)
        print(f"new design: length {length} compiled in {seconds[-1]:.1f}s", file=sys.stderr)
    assert layers.compiler is not None and len(layers.compiler.ready) == len(chosen), layers.compiler.failed
    hits, misses = fx_graph_cache_counts()
    short = engine.tokenize(["warmup"])[0].ids
    rows, length = speed_shape(buckets)
    batch = [(short * length)[:length]] * rows
    return {
        "lengths": list(chosen),
        "seconds": seconds,
        "graphs": graphs_compiled(),
        "fx_graph_cache_hits": hits,
        "fx_graph_cache_misses": misses,
        "compiled_forward_s": steady_seconds(lambda: layers.launch(batch).wait()),
    }


def serve_phase(model_dir: Path, device: str, cache_dir: Path, log_path: Path) -> dict[str, Any]:
    """`scholarembed serve --compile on` at the defaults: seconds from process start to SERVING."""
    port_file = log_path.with_suffix(".port")
    port_file.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "scholarembed_server", "--log-level", "INFO", "serve", "--model", str(model_dir),
        "--port", "0", "--port-file", str(port_file), "--device", device, "--compile", "on",
        "--compile-cache-dir", str(cache_dir), "--no-http", "--no-metrics", "--no-index",
    ]  # fmt: skip
    started = time.perf_counter()
    server = subprocess.Popen(command, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    try:
        while not (port_file.exists() and port_file.read_text()):
            if server.poll() is not None:
                raise RuntimeError(f"server exited:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        return {"serving_s": time.perf_counter() - started}
    finally:
        server.terminate()
        server.wait(60)


def run_phase(phase: str, args: argparse.Namespace, cache_dir: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.startup", "--phase", phase, "--arch", args.arch, "--device", args.device,
               "--work-dir", str(args.work_dir), "--old-shapes", str(args.old_shapes),
               "--new-lengths", str(args.new_lengths), "--budget", str(args.budget)]  # fmt: skip
    environment = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    output = subprocess.run(command, env=environment, check=True, capture_output=True, text=True, cwd=REPO)
    sys.stderr.write("\n".join(line for line in output.stderr.splitlines() if "design:" in line) + "\n")
    return dict(json.loads(output.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="embeddinggemma-300m", choices=["embeddinggemma-300m", "tiny"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--old-shapes", type=int, default=3, help="shapes the old design compiles, to extrapolate")
    parser.add_argument("--new-lengths", type=int, default=0, help="lengths the new design compiles (0: all)")
    parser.add_argument(
        "--budget", type=int, default=1024, help="token budget of the compiled shapes (small: CPU forwards are slow)"
    )
    parser.add_argument("--work-dir", type=Path, default=Path("~/.cache/scholarembed/bench").expanduser())
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--phase", choices=["old", "new"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.work_dir, args.arch)
    if args.phase == "old":
        print(json.dumps(old_phase(model_dir, args.device, args.old_shapes, args.budget)))
        return
    if args.phase == "new":
        print(json.dumps(new_phase(model_dir, args.device, args.new_lengths, args.budget)))
        return

    import torch

    from scholarembed_server.engine import EmbeddingEngine
    from scholarembed_server.model.buckets import LengthBuckets

    max_tokens = EmbeddingEngine.load(str(model_dir), device="cpu").max_tokens
    defaults = {
        budget: LengthBuckets.create(None, max_tokens=max_tokens, max_batch_tokens=budget)
        for budget in DEFAULT_SHAPE_BUDGETS
    }
    lengths = len(defaults[DEFAULT_SHAPE_BUDGETS[0]].lengths)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "arch": args.arch,
        "device": args.device,
        "machine": f"{os.cpu_count()} cores",
        "torch": torch.__version__,
        "max_tokens": max_tokens,
        "bucket_lengths": list(defaults[DEFAULT_SHAPE_BUDGETS[0]].lengths),
        "shapes": {budget: len(buckets.shapes()) for budget, buckets in defaults.items()},
        "budget_compiled": args.budget,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        report["old"] = run_phase("old", args, Path(folder) / "old-cache")
        report["new"] = run_phase("new", args, Path(folder) / "new-cache")
        report["warm"] = run_phase("new", args, Path(folder) / "new-cache")
        report["serve"] = serve_phase(model_dir, args.device, Path(folder) / "serve-cache", args.output / "startup.log")

    old, new, warm = report["old"], report["new"], report["warm"]
    per_shape = sum(old["seconds"]) / len(old["seconds"])
    per_length = sum(new["seconds"]) / len(new["seconds"])
    per_length_warm = sum(warm["seconds"]) / len(warm["seconds"])
    serving = report["serve"]["serving_s"]
    graphs_per_length = new["graphs"] / len(new["lengths"])
    rows = []
    for budget, shapes in report["shapes"].items():
        old_s, new_s = per_shape * shapes, per_length * lengths
        rows.append((budget, shapes, int(graphs_per_length * lengths), old_s, new_s, serving + old_s))
    report["table"] = [dict(zip(TABLE_COLUMNS, row, strict=True)) for row in rows] + [
        {"new_serving_s": serving, "new_warm_compile_s": per_length_warm * lengths}
    ]
    print(f"\n{args.arch} on {args.device} ({report['machine']}), torch {report['torch']}; default bucket lengths "
          f"{report['bucket_lengths']}")  # fmt: skip
    print(f"{'token budget':>12} {'shapes':>7} {'graphs old':>10} {'graphs new':>10} {'compile s old':>14} "
          f"{'compile s new':>14} {'ratio':>6} {'SERVING s old':>14} {'SERVING s new':>14}")  # fmt: skip
    for budget, shapes, graphs, old_s, new_s, old_serving in rows:
        print(f"{budget:>12} {shapes:>7} {shapes:>10} {graphs:>10} {old_s:>14.0f} {new_s:>14.0f} "
              f"{old_s / new_s:>5.1f}x {old_serving:>14.0f} {serving:>14.1f}")  # fmt: skip
    print(f"old: {len(old['seconds'])} shape(s) measured ({', '.join(f'{s:.0f}s' for s in old['seconds'])}), the rest "
          f"extrapolated; new: {len(new['seconds'])} of {lengths} lengths measured "
          f"({', '.join(f'{s:.0f}s' for s in new['seconds'])}, {graphs_per_length:.0f} graphs each)"
          f"{', the rest extrapolated' if len(new['seconds']) < lengths else ''}; "
          f"warm cache {', '.join(f'{s:.1f}s' for s in warm['seconds'])} per length "
          f"({warm['fx_graph_cache_hits']} cache hits, {warm['fx_graph_cache_misses']} misses)")  # fmt: skip
    rows, length = old["speed_shape"]
    print(f"steady forward at {rows} x {length}: whole-model compiled {old['compiled_forward_s'] * 1000:.0f} ms, "
          f"layers compiled {new['compiled_forward_s'] * 1000:.0f} ms "
          f"({new['compiled_forward_s'] / old['compiled_forward_s']:.2f}x the whole model's time), "
          f"eager {old['eager_forward_s'] * 1000:.0f} ms")  # fmt: skip
    path = args.output / f"startup-{args.arch}-{args.device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
