"""Length buckets: shapes, planning, tail handling, and the bucketed (and compiled) path against `forward`."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import cosine
from tiny_model import WORDS

from scholarembed import Client
from scholarembed_server.app import with_buckets
from scholarembed_server.batcher import Batcher
from scholarembed_server.config import ServerConfig
from scholarembed_server.engine import EmbeddingEngine
from scholarembed_server.model.buckets import DEFAULT_BUCKET_LENGTHS, LengthBuckets, Tail
from scholarembed_server.model.compilation import use_compile_cache
from scholarembed_server.model.prompts import InputType

ORACLE = 0.99999


def tiny_buckets(tail: Tail = Tail.SMALLER) -> LengthBuckets:
    # The tiny model's limit is 128 tokens: buckets 8, 16, 32, 64, 128 with 4..32 rows.
    return LengthBuckets.create("8,16,32,64", max_tokens=128, max_batch_tokens=256, tail=tail)


def texts_of(word_counts: list[int], seed: int = 3) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=n)) for n in word_counts]


def test_lengths_round_up_to_the_next_bucket_capped_at_the_token_limit() -> None:
    buckets = LengthBuckets.create(None, max_tokens=1000, max_batch_tokens=65536)
    assert buckets.lengths == (*[n for n in DEFAULT_BUCKET_LENGTHS if n < 1000], 1000)
    assert [buckets.length_for(n) for n in (1, 33, 64, 65, 97, 999, 1000)] == [32, 64, 64, 96, 128, 1000, 1000]
    with pytest.raises(ValueError, match="exceed"):
        buckets.length_for(1001)
    assert LengthBuckets.create("512, 128,256", max_tokens=2048, max_batch_tokens=1).lengths == (128, 256, 512, 2048)


def test_full_rows_fill_the_token_budget() -> None:
    buckets = LengthBuckets.create("64,128,384", max_tokens=2048, max_batch_tokens=65536)
    assert [buckets.full_rows(n) for n in buckets.lengths] == [1024, 512, 170, 32]
    assert LengthBuckets.create(None, max_tokens=2048, max_batch_tokens=1000).full_rows(2048) == 1  # never zero


def test_tail_pads_up_or_takes_the_smallest_ladder_shape_that_fits() -> None:
    smaller = LengthBuckets.create("64,128", max_tokens=256, max_batch_tokens=8192, tail=Tail.SMALLER)
    padded = LengthBuckets.create("64,128", max_tokens=256, max_batch_tokens=8192, tail=Tail.PAD)
    assert smaller.row_ladder(64) == (1, 4, 16, 64, 128)
    assert smaller.row_ladder(256) == (1, 4, 16, 32)
    shapes = [smaller.shape_for(rows, 50) for rows in (1, 2, 5, 64, 100)]
    assert shapes == [(1, 64), (4, 64), (16, 64), (64, 64), (128, 64)]
    assert padded.shape_for(1, 50) == (128, 64)
    assert padded.shapes() == [(128, 64), (64, 128), (32, 256)]
    assert len(smaller.shapes()) == 5 + 4 + 4
    with pytest.raises(ValueError, match="rows exceed"):
        smaller.shape_for(129, 50)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=128), max_size=300), st.sampled_from(list(Tail)))
def test_plan_covers_every_row_once_in_one_bucket_per_batch(lengths: list[int], tail: Tail) -> None:
    buckets = tiny_buckets(tail)
    batches = buckets.plan(lengths)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    bucket_of = [buckets.length_for(max(lengths[i] for i in batch)) for batch in batches]
    assert bucket_of == sorted(bucket_of, reverse=True)  # longest bucket first
    for batch, length in zip(batches, bucket_of, strict=True):
        assert {buckets.length_for(lengths[i]) for i in batch} == {length}
        assert len(batch) <= buckets.full_rows(length)
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
        rows, shape_length = buckets.shape_for(len(batch), max(lengths[i] for i in batch))
        assert rows >= len(batch) and shape_length == length
    # Only the last batch of each bucket may be short of a shape it runs in.
    for earlier, later, length in zip(batches, batches[1:], bucket_of, strict=False):
        if buckets.length_for(max(lengths[i] for i in later)) == length:
            assert len(earlier) in buckets.row_ladder(length)
    if lengths:
        assert buckets.padded_tokens(lengths) >= sum(lengths)


def test_smaller_tails_compute_fewer_padded_tokens_than_padding_up() -> None:
    lengths = list(np.random.default_rng(0).integers(3, 128, size=101))
    assert tiny_buckets(Tail.SMALLER).padded_tokens(lengths) < tiny_buckets(Tail.PAD).padded_tokens(lengths)


def test_a_tail_is_split_along_the_row_ladder_until_padding_wastes_little() -> None:
    buckets = LengthBuckets.create("64", max_tokens=128, max_batch_tokens=64 * 256)  # ladder 1, 4, 16, 64, 256
    sizes = [len(batch) for batch in buckets.plan([50] * (256 + 100))]
    assert sizes == [256, 64, 16, 16, 4]
    assert [len(batch) for batch in buckets.plan([50] * 13)] == [13]  # 13 of 16: padded up


@pytest.mark.parametrize("tail", list(Tail))
def test_bucketed_launch_equals_forward_dummy_rows_included(tiny_engine, tail: Tail) -> None:
    bucketed = tiny_engine.with_buckets(tiny_buckets(tail))
    rows = [t.ids for t in tiny_engine.tokenize(texts_of([1, 5, 9, 3, 2]))]  # 5 rows: padded to 16 (or 32)
    alone = np.concatenate([tiny_engine.runner.forward([row]) for row in rows])
    vectors = bucketed.runner.launch(rows).wait()
    assert vectors.shape == alone.shape  # dummy rows never come back
    assert cosine(vectors, alone).min() >= ORACLE
    assert tiny_engine.runner.buckets is None  # the original engine is untouched


def test_bucketed_forward_planned_and_encode_equal_the_eager_path(tiny_engine) -> None:
    bucketed = tiny_engine.with_buckets(tiny_buckets())
    texts = texts_of([1, 2, 3, 30, 5, 24, 7, 36, 1, 90, 20, 11, 4, 4, 4, 60])  # 90 words: truncated at 128
    eager = tiny_engine.encode(texts, InputType.PASSAGE, max_batch_tokens=64)
    result = bucketed.encode(texts, InputType.PASSAGE)
    assert result.token_counts == eager.token_counts and any(eager.truncated)
    assert cosine(result.vectors, eager.vectors).min() >= ORACLE


def test_batcher_with_buckets_returns_the_same_vectors(tiny_engine) -> None:
    bucketed = tiny_engine.with_buckets(tiny_buckets())
    rows = [t.ids for t in tiny_engine.tokenize(texts_of([1, 40, 3, 12, 2, 7, 25, 1, 9]))]

    async def run() -> list[np.ndarray]:
        batcher = Batcher(bucketed, max_batch_tokens=256, max_queue_tokens=100_000, max_wait_s=0.01)
        batcher.start()
        await batcher.warmup()
        try:
            return await asyncio.gather(*(batcher.embed(rows[i::3], wait=False) for i in range(3)))
        finally:
            await batcher.close()

    results = asyncio.run(run())
    expected = np.concatenate([tiny_engine.runner.forward([row]) for row in rows])
    for offset, vectors in enumerate(results):
        assert cosine(vectors, expected[offset::3]).min() >= ORACLE


def test_flags_keep_cpu_eager_unless_buckets_are_asked_for(tiny_engine) -> None:
    assert with_buckets(tiny_engine, ServerConfig()) is tiny_engine  # CPU default: today's eager path
    bucketed = with_buckets(tiny_engine, ServerConfig(buckets="16,32", tail="pad", max_batch_tokens=512))
    assert bucketed.runner.buckets == LengthBuckets.create("16,32", max_tokens=128, max_batch_tokens=512, tail=Tail.PAD)
    assert bucketed.runner.compiler is None
    with pytest.raises(ValueError, match="static shapes"):
        with_buckets(tiny_engine, ServerConfig(compile="on", buckets="off"))


def test_server_with_buckets_answers_as_the_eager_engine(tiny_engine, in_process_server) -> None:
    server = in_process_server(buckets="16,32,64", max_batch_tokens=512)
    assert server.server.engine.runner.buckets is not None
    texts = texts_of([2, 9, 30, 4])
    with Client(server.address) as client:
        vectors = client.embed_queries(texts)
    assert cosine(vectors, tiny_engine.encode(texts, InputType.QUERY).vectors).min() >= ORACLE


def compiled_matches_eager(engine: EmbeddingEngine, buckets: LengthBuckets, minimum: float, tmp_path) -> None:
    use_compile_cache(tmp_path / "inductor")
    compiled = engine.with_buckets(buckets, compile_mode="default").runner
    compiled.compile_buckets()
    rows = [t.ids for t in engine.tokenize(texts_of([1, 12, 3]))]
    for batch in (rows, rows[:1]):  # three rows in four (a dummy row); one row alone
        vectors = compiled.launch(batch).wait()
        assert vectors.shape == (len(batch), engine.dimensions)
        assert cosine(vectors, np.concatenate([engine.runner.forward([row]) for row in batch])).min() >= minimum


@pytest.mark.slow
def test_compiled_buckets_equal_eager_on_cpu(tiny_engine, tmp_path) -> None:
    buckets = LengthBuckets.create("32", max_tokens=128, max_batch_tokens=128)  # shapes (1, 32), (4, 32), ...
    compiled_matches_eager(tiny_engine, buckets, ORACLE, tmp_path)


@pytest.mark.gpu
def test_compiled_bf16_buckets_equal_eager_bf16_on_cuda(tiny_model_dir, tmp_path) -> None:
    engine = EmbeddingEngine.load(str(tiny_model_dir), device="cuda")
    assert engine.model.dtype == torch.bfloat16
    buckets = LengthBuckets.create("32", max_tokens=engine.max_tokens, max_batch_tokens=128)
    compiled_matches_eager(engine, buckets, 0.999, tmp_path)  # bf16: kernels may round differently
    full = engine.with_buckets(buckets, compile_mode="default")
    texts = texts_of([1, 2, 3, 30, 5, 24, 7, 36, 1, 90, 20, 11] * 5)
    assert cosine(full.encode(texts, InputType.QUERY).vectors, engine.encode(texts, InputType.QUERY).vectors).min() > (
        0.999
    )
