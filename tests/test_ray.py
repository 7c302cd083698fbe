"""The Ray door on a real local Ray cluster: bulk encoding into Parquet shards, faults, resume, loading.

One cluster for the module (ray.init(num_cpus=2)); actors ask for half a CPU so Ray Data's own tasks
are never starved. Each pool of engine actors costs an actor start (torch import, model load), so
the tests share runs where they can.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from conftest import TINY_MATRYOSHKA  # noqa: E402
from scifact_subset import SCIFACT, write_subset  # noqa: E402

from scholarembed import Client  # noqa: E402
from scholarembed_server.errors import FailedPreconditionError, InvalidArgumentError  # noqa: E402
from scholarembed_server.index.base import IndexKind, VectorStorage  # noqa: E402
from scholarembed_server.index.embedded import DataDirInUseError, EmbeddedIndex  # noqa: E402
from scholarembed_server.model.prompts import InputType  # noqa: E402
from scholarembed_server.ray import (  # noqa: E402
    CorpusError,
    EngineSpec,
    FleetSpec,
    ShardsError,
    embed_corpus,
    load_shards,
)
from scholarembed_server.ray.shards import MANIFEST, completed_shards, read_shard, vector_column  # noqa: E402

ROWS = 90
DIMS = tuple(int(d) for d in TINY_MATRYOSHKA.split(","))
ACTOR = {"actors": 1, "cpus_per_actor": 0.5, "progress": False}


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default, 15, starves actors on a shared machine
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def corpus_records(count: int = ROWS) -> list[dict[str, Any]]:
    topics = ["graphene band gaps", "protein folding", "dark matter halos", "CRISPR off-target effects"]
    return [
        {
            "_id": f"doc-{i}",
            "title": f"On {topics[i % 4]}" if i % 3 else "",
            "text": f"Abstract {i}: we study {topics[i % 4]} " + "with careful measurements " * (i % 7),
            "metadata": {"year": str(2000 + i % 20)},
        }
        for i in range(count)
    ]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", corpus_records())


@pytest.fixture(scope="module")
def spec(tiny_model_dir: Path) -> EngineSpec:
    return EngineSpec(str(tiny_model_dir), matryoshka_dims=DIMS)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, corpus: Path, spec: EngineSpec) -> Path:
    """One complete run over the corpus at full dimension, float32, in shards of 20 rows (the last of 10)."""
    output = tmp_path_factory.mktemp("run") / "shards"
    summary = embed_corpus(str(corpus), str(output), engine=spec, rows_per_shard=20, **ACTOR)
    assert (summary.rows, summary.shards_written, summary.shards_total) == (ROWS, 5, 5)
    assert summary.tokens > ROWS and summary.rows_per_second > 0
    return output


def all_rows(output: Path) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    names = sorted(completed_shards(str(output)))
    files = [read_shard(str(output), name) for name in names]
    return [i for f in files for i in f.ids], np.concatenate([f.vectors for f in files]), files[0].metadata


def test_ray_vectors_equal_the_in_process_engine_with_every_id_once(shards: Path, tiny_engine: Any) -> None:
    ids, vectors, metadata = all_rows(shards)
    records = corpus_records()
    assert sorted(ids) == sorted(r["_id"] for r in records) and len(set(ids)) == len(ids) == ROWS
    expected = tiny_engine.encode(
        [r["text"] for r in records], InputType.PASSAGE, titles=[r["title"] for r in records]
    ).vectors
    position = {r["_id"]: n for n, r in enumerate(records)}
    expected = expected[[position[i] for i in ids]]
    cosines = np.sum(vectors * expected, axis=1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosines.min() >= 0.99999
    assert metadata["model"] == tiny_engine.model_id and metadata["model_source"] == tiny_engine.model.source
    assert (metadata["dimensions"], metadata["encoding"], metadata["input_type"]) == (64, "float32", "passage")
    assert "title: {title} | text: {text}" in metadata["prompt"]
    table = pq.read_table(shards / f"{sorted(completed_shards(str(shards)))[0]}.parquet")
    assert table.schema.names == ["id", "vector", "token_count", "truncated"]
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 64)


def test_a_rerun_of_a_complete_run_embeds_nothing(shards: Path, corpus: Path, spec: EngineSpec) -> None:
    summary = embed_corpus(str(corpus), str(shards), engine=spec, rows_per_shard=20, **ACTOR)
    assert (summary.rows, summary.shards_written, summary.shards_skipped) == (0, 0, 5)


def test_a_killed_actor_is_replaced_and_the_output_is_complete_exactly_once(
    tmp_path: Path, corpus: Path, spec: EngineSpec
) -> None:
    at_kill: list[int] = []

    def kill_the_actor_once(row: dict[str, Any]) -> None:
        if not at_kill:  # the first shard is in; the actor is on the next one
            at_kill.append(len(completed_shards(str(tmp_path / "out"))))
            os.kill(int(row["pid"]), signal.SIGKILL)

    summary = embed_corpus(
        str(corpus), str(tmp_path / "out"), engine=spec, rows_per_shard=6, on_shard=kill_the_actor_once, **ACTOR
    )
    assert at_kill and at_kill[0] < 15, "the actor must die mid-run"
    assert summary.actor_processes == 2  # the one killed and its replacement
    ids, _, _ = all_rows(tmp_path / "out")
    assert sorted(ids) == sorted(r["_id"] for r in corpus_records()) and len(ids) == ROWS
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith("_tmp-")]


def test_an_interrupted_run_resumes_without_redoing_finished_shards(
    tmp_path: Path, corpus: Path, spec: EngineSpec
) -> None:
    output = tmp_path / "out"

    def interrupt_after_two(row: dict[str, Any]) -> None:
        if len(completed_shards(str(output))) >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_corpus(str(corpus), str(output), engine=spec, rows_per_shard=6, on_shard=interrupt_after_two, **ACTOR)
    time.sleep(1)  # let a shard that was in flight finish or die
    before = {p.name: p.stat().st_mtime_ns for p in output.glob("*.parquet")}
    assert 2 <= len(before) < 15
    summary = embed_corpus(str(corpus), str(output), engine=spec, rows_per_shard=6, **ACTOR)
    assert summary.shards_skipped == len(before) and summary.shards_written == 15 - len(before)
    assert {name: (output / name).stat().st_mtime_ns for name in before} == before  # untouched
    ids, _, _ = all_rows(output)
    assert sorted(ids) == sorted(r["_id"] for r in corpus_records()) and len(ids) == ROWS


def search_ids(address: str, queries: list[str]) -> list[list[tuple[str, float]]]:
    with Client(address) as client:
        return [[(h.id, h.score) for h in client.search(q, collection="papers", top_k=10)] for q in queries]


QUERIES = ["graphene band gaps", "protein folding measurements", "dark matter", "CRISPR"]


def test_loaded_shards_search_like_a_collection_built_by_upsert_passages(
    tmp_path: Path, shards: Path, in_process_server: Any
) -> None:
    built = in_process_server(data_dir=str(tmp_path / "upserted"))
    with Client(built.address) as client:
        client.upsert_passages("papers", corpus_records())
    expected = search_ids(built.address, QUERIES)

    store = EmbeddedIndex(tmp_path / "loaded")
    summary = load_shards(str(shards), "papers", store, progress=False)
    assert (summary.loaded, summary.passage_count) == (ROWS, ROWS)
    assert load_shards(str(shards), "papers", store, progress=False).skipped == ROWS  # a rerun adds nothing
    assert store.get("papers", ["doc-4"])[0].metadata == {"year": "2004"}
    store.close()
    loaded = search_ids(in_process_server(data_dir=str(tmp_path / "loaded")).address, QUERIES)
    for got, want in zip(loaded, expected, strict=True):
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=2e-3)


def test_loading_into_milvus_gives_the_embedded_stores_hits(tmp_path: Path, shards: Path, tiny_engine: Any) -> None:
    from scholarembed_server.index.milvus import MilvusIndex

    queries = tiny_engine.encode(QUERIES, InputType.QUERY).vectors
    hits = []
    for store in (EmbeddedIndex(tmp_path / "embedded"), MilvusIndex(str(tmp_path / "milvus.db"), matryoshka_dims=DIMS)):
        load_shards(str(shards), "papers", store, vector_storage="float32", progress=False)
        hits.append([[h.id for h in q] for q in store.search("papers", queries, 10)])
        store.close()
    assert hits[0] == hits[1]


def test_fleet_mode_embeds_through_running_servers(tmp_path: Path, shards: Path, in_process_server: Any) -> None:
    servers = [in_process_server(), in_process_server()]
    fleet = FleetSpec(tuple(s.address for s in servers))
    corpus = write_jsonl(tmp_path / "corpus.jsonl", corpus_records())
    summary = embed_corpus(str(corpus), str(tmp_path / "fleet"), fleet=fleet, rows_per_shard=30, **ACTOR)
    assert summary.rows == ROWS
    fleet_ids, fleet_vectors, metadata = all_rows(tmp_path / "fleet")
    engine_ids, engine_vectors, engine_metadata = all_rows(shards)
    order = {i: n for n, i in enumerate(engine_ids)}
    cosines = np.sum(fleet_vectors * engine_vectors[[order[i] for i in fleet_ids]], axis=1)
    assert sorted(fleet_ids) == sorted(engine_ids) and cosines.min() >= 0.99999
    assert metadata["model"] == engine_metadata["model"] and metadata["prompt"] == engine_metadata["prompt"]


# -- bad input: a clear error, and nothing that looks complete ------------------------------------------------


def nothing_written(output: Path) -> bool:
    return not output.exists() or not [p for p in output.iterdir() if p.suffix == ".parquet"]


def test_a_missing_column_is_named_before_anything_is_written(tmp_path: Path, spec: EngineSpec) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "body": "no text field"}])
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: no 'text' field"):
        embed_corpus(str(corpus), str(tmp_path / "out"), engine=spec, **ACTOR)
    table = pa.table({"_id": ["a"], "abstract": ["x"]})
    pq.write_table(table, tmp_path / "c.parquet")
    with pytest.raises(CorpusError, match=r"c\.parquet.*no 'text' field"):
        embed_corpus(str(tmp_path / "c.parquet"), str(tmp_path / "out"), engine=spec, **ACTOR)
    assert nothing_written(tmp_path / "out") and not (tmp_path / "out" / MANIFEST).exists()


def test_a_bad_record_mid_run_fails_its_shard_and_the_run_cannot_be_loaded(tmp_path: Path, spec: EngineSpec) -> None:
    records = corpus_records(30)
    del records[25]["text"]
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    output = tmp_path / "out"
    with pytest.raises(CorpusError, match=r"c\.jsonl record 26: no 'text' field"):
        embed_corpus(str(corpus), str(output), engine=spec, rows_per_shard=10, **ACTOR)
    assert not any(name.endswith("000000000020") for name in completed_shards(str(output)))
    with pytest.raises(ShardsError, match="incomplete"):
        load_shards(str(output), "papers", EmbeddedIndex(tmp_path / "data"), progress=False)


def test_an_unreadable_file_is_refused(tmp_path: Path, spec: EngineSpec) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match="cannot be read as Parquet"):
        embed_corpus(str(tmp_path / "broken.parquet"), str(tmp_path / "out"), engine=spec, **ACTOR)
    with pytest.raises(CorpusError, match="no such file"):
        embed_corpus(str(tmp_path / "absent.jsonl"), str(tmp_path / "out"), engine=spec, **ACTOR)
    (tmp_path / "bad.jsonl").write_text('{"_id": "a", "text": "fine"}\n')
    (tmp_path / "bad.jsonl").chmod(0)
    if os.access(tmp_path / "bad.jsonl", os.R_OK):  # root reads anything; the permission test means nothing
        (tmp_path / "bad.jsonl").write_bytes(b"\xff\xfe{garbage\n")
        with pytest.raises(CorpusError, match=r"bad\.jsonl:1: not a JSON object"):
            embed_corpus(str(tmp_path / "bad.jsonl"), str(tmp_path / "out"), engine=spec, **ACTOR)
    else:
        with pytest.raises(CorpusError, match="cannot be read"):
            embed_corpus(str(tmp_path / "bad.jsonl"), str(tmp_path / "out"), engine=spec, **ACTOR)
    assert nothing_written(tmp_path / "out")


def test_a_dimension_that_is_not_matryoshka_is_refused_with_the_servers_words(
    tmp_path: Path, corpus: Path, spec: EngineSpec
) -> None:
    with pytest.raises(InvalidArgumentError, match=r"dimensions: 48 is not one of \[64, 32, 16\]"):
        embed_corpus(str(corpus), str(tmp_path / "out"), engine=spec, dimensions=48, **ACTOR)
    assert nothing_written(tmp_path / "out")


def test_a_collection_of_another_model_is_refused_and_left_as_it_was(tmp_path: Path, shards: Path) -> None:
    store = EmbeddedIndex(tmp_path / "data")
    store.create_collection(
        "papers", dimensions=64, model="another-model", index_kind=IndexKind.FLAT, vector_storage=VectorStorage.FLOAT16
    )
    with pytest.raises(FailedPreconditionError, match="holds 64-d vectors of model 'another-model'"):
        load_shards(str(shards), "papers", store, progress=False)
    assert store.get_collection("papers").passage_count == 0
    store.close()


def test_a_rerun_with_other_settings_is_refused(tmp_path: Path, shards: Path, corpus: Path, spec: EngineSpec) -> None:
    with pytest.raises(ShardsError, match="holds a run with other inputs or settings"):
        embed_corpus(str(corpus), str(shards), engine=spec, rows_per_shard=20, dimensions=32, **ACTOR)


def test_shards_that_are_not_full_dimension_floats_cannot_be_loaded(tmp_path: Path, shards: Path) -> None:
    manifest = json.loads((shards / MANIFEST).read_text())
    for change, words in [({"dimensions": 32}, "full 64 dimensions"), ({"encoding": "binary"}, "binary vectors")]:
        fake = tmp_path / f"run-{next(iter(change.values()))}"
        fake.mkdir()
        for shard in shards.glob("*.parquet"):
            (fake / shard.name).symlink_to(shard)
        (fake / MANIFEST).write_text(json.dumps({**manifest, "metadata": {**manifest["metadata"], **change}}))
        with pytest.raises(ShardsError, match=words):
            load_shards(str(fake), "papers", EmbeddedIndex(tmp_path / "data"), progress=False)


def test_a_data_dir_held_by_another_process_is_refused(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from scholarembed_server.index.embedded import EmbeddedIndex; "
         f"store = EmbeddedIndex({str(tmp_path / 'data')!r}); print('open', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(DataDirInUseError, match="in use by another process"):
            EmbeddedIndex(tmp_path / "data")
    finally:
        holder.kill()
        holder.wait()


def test_vector_encodings_round_trip() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((5, 16)).astype(np.float32)
    assert vector_column(vectors, "float16").type == pa.list_(pa.float16(), 16)
    packed = vector_column(vectors, "binary")
    assert packed.type == pa.binary(2)
    assert packed[0].as_py() == np.packbits(vectors[0] > 0).tobytes()


# -- the CLI, end to end, on SciFact with the real MiniLM ------------------------------------------------------


@pytest.mark.slow  # about 3 minutes of MiniLM on 2 cores; `make eval-ray` runs the full corpus the same way
def test_cli_embed_with_ray_then_load_then_eval_reproduces_the_reference_on_a_scifact_subset(
    tmp_path: Path, minilm_dir: Path
) -> None:
    from conftest import ServerProcess
    from test_quality import FROZEN

    source = SCIFACT if SCIFACT.exists() else Path(os.environ.get("SCHOLAREMBED_SCIFACT", "/nonexistent"))
    if not source.exists():
        pytest.skip("needs ../shared/data/scifact")
    subset = write_subset(tmp_path / "scifact", source)
    cli = [sys.executable, "-m", "scholarembed_server", "--log-level", "WARNING"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # this module's cluster
    subprocess.run(
        [*cli, "embed", "--engine", "ray", "--model", str(minilm_dir), "--input", str(subset / "corpus.jsonl"),
         "--output", str(tmp_path / "shards"), "--rows-per-shard", "300", "--actors", "1", "--cpus-per-actor", "1",
         "--no-progress"],
        check=True, timeout=600, env=env,
    )  # fmt: skip
    subprocess.run(
        [*cli, "load", "--shards", str(tmp_path / "shards"), "--collection", "scifact",
         "--data-dir", str(tmp_path / "data"), "--no-progress"],
        check=True, timeout=600,
    )  # fmt: skip
    server = ServerProcess(tmp_path, "--model", str(minilm_dir), "--data-dir", str(tmp_path / "data"))
    try:
        result = subprocess.run(
            [*cli, "eval", "--beir", str(subset), "--split", "test", "--collection", "scifact",
             "--server", server.address, "--no-progress"],
            check=True, timeout=600, capture_output=True, text=True,
        )  # fmt: skip
    finally:
        server.stop()
    metrics = json.loads(result.stdout)
    assert metrics["queries"] == 50
    for name, expected in FROZEN["dense"].items():
        assert metrics[name] == pytest.approx(expected, abs=5e-4), name


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_records(3))
    result = subprocess.run(
        [sys.executable, "-m", "scholarembed_server", "embed", "--engine", "ray", "--model", str(tiny_model_dir),
         "--matryoshka-dims", TINY_MATRYOSHKA, "--dimensions", "48", "--input", str(corpus),
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "error: dimensions: 48 is not one of [64, 32, 16]" in result.stderr
    assert "Traceback" not in result.stderr
