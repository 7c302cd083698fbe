"""GPU start-up on CPU: regional compilation (graph counts, equality, fallback), serving early, shipped
compilations, device-sized defaults, and start-up failures that print one line.

Graph counts use torch.compile's "eager" backend: dynamo captures the same graphs as for inductor (what
a count measures) without inductor's minutes of C++ compiling on two cores.
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from reference import cosine
from tiny_model import WORDS, build_long_tiny_embeddinggemma

from scholarembed import Client
from scholarembed_server.batcher import Batcher
from scholarembed_server.config import ServerConfig, batch_token_budget, default_tokenizer_threads
from scholarembed_server.engine import EmbeddingEngine
from scholarembed_server.metrics import Metrics
from scholarembed_server.model.buckets import LengthBuckets
from scholarembed_server.model.compilation import graphs_compiled
from scholarembed_server.model.prompts import InputType
from scholarembed_server.random_model import build_tokenizer

ORACLE = 0.99999


def texts_of(word_counts: list[int], seed: int = 5) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=n)) for n in word_counts]


def rows_of(engine: EmbeddingEngine, word_counts: list[int]) -> list[list[int]]:
    return [t.ids for t in engine.tokenize(texts_of(word_counts))]


def eager_reference(engine: EmbeddingEngine, rows: list[list[int]]) -> np.ndarray:
    return np.concatenate([engine.runner.forward([row]) for row in rows])


@pytest.fixture(scope="module")
def long_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with EmbeddingGemma's 2048-token limit, so the default buckets are the real ones."""
    folder = tmp_path_factory.mktemp("long-tiny")
    build_tokenizer(folder / "tokenizer")
    # Six layers: Gemma3's pattern, five sliding-window layers, then a full-attention one.
    return build_long_tiny_embeddinggemma(
        folder / "model", tokenizer_folder=folder / "tokenizer", vocab_size=400, num_hidden_layers=6
    )


def fresh_engine(folder: Path) -> EmbeddingEngine:
    """An engine of its own, so a test's compilations start from a model no other test has run."""
    return EmbeddingEngine.load(str(folder))


def assert_one_graph_per_length_and_layer_kind(engine: EmbeddingEngine, buckets: LengthBuckets) -> None:
    """Compile, run every static shape, and count: one graph per bucket length, shared by every layer of
    both kinds (sliding-window and full attention); the row ladder adds nothing. The former design
    compiled once per shape."""
    torch._dynamo.reset()  # counts start from nothing; other tests' compilations recompile if needed
    before = graphs_compiled()
    compiled = engine.with_buckets(buckets, compile_mode="default", compile_backend="eager").runner
    assert compiled.compiler is not None
    compiled.compile_buckets()
    assert compiled.compiler.ready == set(buckets.lengths) and not compiled.compiler.failed
    short = engine.tokenize(["warmup"])[0].ids
    for rows, length in buckets.shapes():  # every static shape a batch can run in
        pending = compiled.launch([(short * length)[:length]] + [short] * (rows - 1))
        assert pending.eager_reason is None
        assert pending.wait().shape == (rows, engine.dimensions)
    assert graphs_compiled() - before == len(buckets.lengths) < len(buckets.shapes())


def test_a_row_ladder_costs_no_compilations(tiny_model_dir) -> None:
    engine = fresh_engine(tiny_model_dir)
    buckets = LengthBuckets.create("16,32,64", max_tokens=engine.max_tokens, max_batch_tokens=256)
    assert len(buckets.shapes()) == 10 and len(buckets.lengths) == 4
    assert_one_graph_per_length_and_layer_kind(engine, buckets)


def test_every_default_shape_is_covered_by_one_graph_per_bucket_length(long_tiny_dir) -> None:
    engine = fresh_engine(long_tiny_dir)
    buckets = LengthBuckets.create(None, max_tokens=engine.max_tokens, max_batch_tokens=16384)
    assert (len(buckets.lengths), len(buckets.shapes())) == (12, 51)  # 12 graphs where there were 51
    assert_one_graph_per_length_and_layer_kind(engine, buckets)


@pytest.mark.slow  # dynamo traces the whole model (masks, rotary, 2 layers, pooling) once per shape
def test_the_former_whole_forward_design_compiles_once_per_shape(tiny_model_dir) -> None:
    torch._dynamo.reset()
    engine = fresh_engine(tiny_model_dir)
    buckets = LengthBuckets.create("16", max_tokens=32, max_batch_tokens=64)  # shapes 1, 4 x 16; 1, 2 x 32
    from bench.whole_model import WholeModelCompiled

    whole = WholeModelCompiled(engine.model, buckets, backend="eager")
    before = graphs_compiled()
    short = engine.tokenize(["warmup"])[0].ids
    for rows, length in buckets.shapes():
        whole.launch([(short * length)[:length]] * rows)
    assert graphs_compiled() - before == len(buckets.shapes()) == 4


def test_compiled_layers_equal_the_eager_reference_dummy_rows_and_full_rows_included(tiny_model_dir) -> None:
    engine = fresh_engine(tiny_model_dir)
    buckets = LengthBuckets.create("16,32", max_tokens=engine.max_tokens, max_batch_tokens=256)
    compiled = engine.with_buckets(buckets, compile_mode="default", compile_backend="eager").runner
    compiled.compile_buckets()
    for word_counts in ([1, 12, 3], [2], [9] * 8, [40, 1]):  # dummy rows; one row (run as two); longer ones
        rows = rows_of(engine, word_counts)
        pending = compiled.launch(rows)
        assert pending.eager_reason is None
        assert cosine(pending.wait(), eager_reference(engine, rows)).min() >= ORACLE
    # A full batch without padding: transformers drops the mask, the compiled layer gets an all-true one.
    exact = [row[:16] for row in rows_of(engine, [30] * 16)]  # 16 rows of 16 tokens: the full 16 x 16 shape
    assert {len(row) for row in exact} == {16}
    assert cosine(compiled.launch(exact).wait(), eager_reference(engine, exact)).min() >= ORACLE


def test_inductor_compiled_layers_equal_the_eager_reference(tiny_model_dir, tmp_path) -> None:
    from scholarembed_server.model.compilation import use_compile_cache

    use_compile_cache(tmp_path / "inductor")
    engine = fresh_engine(tiny_model_dir)
    buckets = LengthBuckets.create("16", max_tokens=16, max_batch_tokens=64)  # one length: rows 1, 4
    compiled = engine.with_buckets(buckets, compile_mode="default").runner
    assert compiled.compiler is not None
    compiled.compile_buckets()
    assert compiled.compiler.ready == {16}
    for word_counts in ([1, 12, 3], [2], [9] * 4):
        rows = [row[:16] for row in rows_of(engine, word_counts)]
        assert cosine(compiled.launch(rows).wait(), eager_reference(engine, rows)).min() >= ORACLE


def test_lengths_compiled_on_another_thread_each_get_their_graph(tiny_model_dir) -> None:
    """The server compiles on a thread of its own. Dynamo's recompile limit (8 cache entries) is a per-thread
    setting in torch 2.13, so it must be raised on that thread too: past the eighth length, a length would be
    reported ready while its layers silently ran eager."""
    torch._dynamo.reset()
    engine = fresh_engine(tiny_model_dir)
    lengths = ",".join(str(8 * i) for i in range(1, 11))  # 10 lengths, and the model's 128
    buckets = LengthBuckets.create(lengths, max_tokens=engine.max_tokens, max_batch_tokens=256)
    runner = engine.with_buckets(buckets, compile_mode="default", compile_backend="eager").runner
    assert runner.compiler is not None
    before = graphs_compiled()
    compiling = threading.Thread(target=runner.compile_buckets)
    compiling.start()
    compiling.join()
    assert runner.compiler.ready == set(buckets.lengths) == set(range(8, 88, 8)) | {128}
    assert graphs_compiled() - before == len(buckets.lengths)  # one graph each: none fell back to eager


def test_runners_sharing_a_model_keep_their_own_compilations(tiny_model_dir) -> None:
    """Compilers never touch the model: each runs its compiled layers only where it is active, so a runner
    whose compilation fails at a length stays eager there while another runner of the same model is compiled,
    and the plain model (the eager reference) runs no compiled code at all."""
    engine = fresh_engine(tiny_model_dir)
    buckets = LengthBuckets.create("16", max_tokens=engine.max_tokens, max_batch_tokens=64)
    failing = engine.with_buckets(buckets, compile_mode="default", compile_backend=failing_at(16)).runner
    working = engine.with_buckets(buckets, compile_mode="default", compile_backend="eager").runner
    assert failing.compiler is not None and working.compiler is not None
    working.compile_buckets()
    failing.compile_buckets()
    assert working.compiler.ready == {16, engine.max_tokens} and 16 in failing.compiler.failed
    rows = [row[:16] for row in rows_of(engine, [3, 9])]  # the 16-token bucket
    assert failing.launch(rows).eager_reason == "failed"
    assert working.launch(rows).eager_reason is None
    before = graphs_compiled()
    assert cosine(working.launch(rows).wait(), eager_reference(engine, rows)).min() >= ORACLE
    assert graphs_compiled() == before  # nothing recompiled: each runner found its own compilations


def failing_at(length: int, release: threading.Event | None = None) -> Any:
    """A torch.compile backend that fails on graphs of this sequence length (inductor failures are real:
    flex_attention failed inside it on torch 2.11) and, given `release`, holds every compilation until set."""

    def backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        if release is not None:
            release.wait(60)
        hidden = next(t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 3)
        if hidden.shape[1] == length:
            raise RuntimeError(f"injected failure at length {length}")
        return graph.forward

    return backend


def test_a_failed_compilation_leaves_its_length_eager_with_a_log_line_and_a_metric(tiny_model_dir, caplog) -> None:
    engine = fresh_engine(tiny_model_dir)
    buckets = LengthBuckets.create("16,32", max_tokens=engine.max_tokens, max_batch_tokens=128)
    compiled = engine.with_buckets(buckets, compile_mode="default", compile_backend=failing_at(32))
    compiler = compiled.runner.compiler
    assert compiler is not None
    with caplog.at_level(logging.WARNING, logger="scholarembed_server.model.runner"):
        compiled.runner.compile_buckets()
    assert compiler.ready == {16, 128} and set(compiler.failed) == {32}
    assert "bucket length 32 runs eager: its compilation failed" in caplog.text
    assert "injected failure at length 32" in caplog.text
    metrics = Metrics()
    rows = [row[:24] for row in rows_of(engine, [40, 3, 1])]  # longest 24 tokens: the 32-token bucket

    async def run() -> np.ndarray:
        batcher = Batcher(compiled, max_batch_tokens=128, max_queue_tokens=10_000, max_wait_s=0, metrics=metrics)
        batcher.start()
        try:
            return await batcher.embed(rows, wait=False)
        finally:
            await batcher.close()

    assert cosine(asyncio.run(run()), eager_reference(engine, rows)).min() >= ORACLE
    assert metrics.registry.get_sample_value("scholarembed_eager_fallback_batches_total", {"reason": "failed"}) == 1


def test_the_server_serves_eagerly_while_compiling_then_switches_to_compiled(tiny_model_dir, in_process_server) -> None:
    engine = fresh_engine(tiny_model_dir)
    release = threading.Event()
    buckets = LengthBuckets.create("16", max_tokens=engine.max_tokens, max_batch_tokens=64)
    compiled = engine.with_buckets(buckets, compile_mode="default", compile_backend=failing_at(-1, release))
    compiler = compiled.runner.compiler
    assert compiler is not None
    server = in_process_server(compiled)  # SERVING although no length can compile until `release`
    metrics = server.server.metrics
    texts = texts_of([3, 9])
    expected = engine.encode(texts, InputType.QUERY).vectors
    try:
        with Client(server.address) as client:
            assert cosine(client.embed_queries(texts), expected).min() >= ORACLE
            assert metrics.registry.get_sample_value("scholarembed_compiled_bucket_lengths") == 0
            eager = {"reason": "compiling"}
            assert metrics.registry.get_sample_value("scholarembed_eager_fallback_batches_total", eager)
            release.set()
            deadline = time.monotonic() + 300
            while len(compiler.ready) < len(buckets.lengths) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert compiler.ready == set(buckets.lengths)
            assert metrics.registry.get_sample_value("scholarembed_compiled_bucket_lengths") == len(buckets.lengths)
            eager_so_far = metrics.registry.get_sample_value(
                "scholarembed_eager_fallback_batches_total", {"reason": "compiling"}
            )
            assert cosine(client.embed_queries(texts), expected).min() >= ORACLE
            assert (
                metrics.registry.get_sample_value("scholarembed_eager_fallback_batches_total", {"reason": "compiling"})
                == eager_so_far
            )
    finally:
        release.set()


def test_defaults_are_sized_for_the_device() -> None:
    assert batch_token_budget(0, "cuda") == 65536
    assert batch_token_budget(0, "cpu") == 16384
    assert batch_token_budget(4096, "cuda") == 4096
    assert ServerConfig().max_batch_tokens == 0
    assert 2 <= default_tokenizer_threads() <= 8
    assert ServerConfig().tokenizer_threads == default_tokenizer_threads()


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scholarembed_server", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "/nowhere/model"], "not a folder"),
        (["--model", "no-such-org/no-such-model"], "could not be loaded"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--compile", "sometimes"], "--compile 'sometimes'"),
    ],
)
def test_start_up_failures_print_one_line_and_exit_non_zero(tiny_model_dir, flags, message) -> None:
    if flags[0] == "--device" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if flags[0] != "--model":
        flags = ["--model", str(tiny_model_dir), *flags]
    result = run_cli("serve", "--port", "0", *flags)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("scholarembed serve: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_a_replica_starts_warm_from_a_shipped_compile_folder(tiny_model_dir, tmp_path) -> None:
    flags = ["--model", str(tiny_model_dir), "--buckets", "16", "--max-tokens", "16", "--max-batch-tokens", "64"]
    shipped = tmp_path / "shipped"
    result = run_cli("compile", *flags, "--compile-cache-dir", str(tmp_path / "builder-cache"), "--output",
                     str(shipped), timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (shipped / "torch-cache-artifacts.bin").stat().st_size > 0
    # A fresh replica: an empty compile cache of its own, only the shipped folder to start from.
    port_file = tmp_path / "port"
    log_path = tmp_path / "replica.log"
    command = [sys.executable, "-m", "scholarembed_server", "serve", *flags, "--compile", "on", "--port", "0",
               "--port-file", str(port_file), "--compile-cache-dir", str(tmp_path / "replica-cache"),
               "--compile-artifacts", str(shipped)]  # fmt: skip
    with log_path.open("wb") as log_file:
        replica = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "bucket lengths compiled" not in log_path.read_text() and time.monotonic() < deadline:
            assert replica.poll() is None, log_path.read_text()
            time.sleep(0.2)
        text = log_path.read_text()
        assert "loaded compile artifacts" in text
        assert "1 of 1 bucket lengths compiled" in text, text
        counts = [
            (int(loaded), int(anew))
            for loaded, anew in re.findall(r"(\d+) loaded from the compile cache, (\d+) compiled anew", text)
        ]
        assert counts, text
        # Every graph came from the shipped folder: at least one loaded, none compiled here.
        assert sum(loaded for loaded, _ in counts) >= 1 and all(anew == 0 for _, anew in counts), text
    finally:
        replica.terminate()
        replica.wait(60)
