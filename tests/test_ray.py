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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray  # the `ray` extra, which `make install` installs: its absence is a failure, not a skip
from conftest import TINY_MATRYOSHKA, wait_for
from reference import ModelCard, card_passage, cosine
from scifact_subset import SCIFACT, write_subset

from scholarembed import Client, ResourceExhaustedError, UnavailableError, errors
from scholarembed_server.config import ServerConfig
from scholarembed_server.errors import FailedPreconditionError, InvalidArgumentError
from scholarembed_server.index.base import IndexKind, VectorStorage
from scholarembed_server.index.embedded import DataDirInUseError, EmbeddedIndex
from scholarembed_server.model.prompts import InputType
from scholarembed_server.ray import CorpusError, FleetSpec, ShardsError, embed_corpus, load_shards
from scholarembed_server.ray.encode import retryable
from scholarembed_server.ray.shards import MANIFEST, TEMPORARY_PREFIX, completed_shards, read_shard

ROWS = 90
DIMS = tuple(int(d) for d in TINY_MATRYOSHKA.split(","))
ACTOR = {"input_type": "passage", "actors": 1, "cpus_per_actor": 0.5, "progress": False}


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
def spec(tiny_model_dir: Path) -> ServerConfig:
    """serve's settings for the tiny model: what the actors load."""
    return ServerConfig(model=str(tiny_model_dir), matryoshka_dims=TINY_MATRYOSHKA)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, corpus: Path, spec: ServerConfig) -> Path:
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


def test_ray_vectors_are_the_model_cards_with_every_id_once(shards: Path, tiny_model_dir: Path) -> None:
    ids, vectors, metadata = all_rows(shards)
    records = {r["_id"]: r for r in corpus_records()}
    assert sorted(ids) == sorted(records) and len(set(ids)) == len(ids) == ROWS
    card = ModelCard(tiny_model_dir, max_length=128)
    expected = [card.embed(card_passage(records[i]["text"], records[i]["title"])) for i in ids]
    assert cosine(vectors, expected).min() >= 0.99999
    assert metadata["model_source"] == str(tiny_model_dir)
    assert (metadata["dimensions"], metadata["encoding"], metadata["input_type"]) == (64, "float32", "passage")
    assert "title: {title} | text: {text}" in metadata["prompt"]
    table = pq.read_table(shards / f"{sorted(completed_shards(str(shards)))[0]}.parquet")
    assert table.schema.names == ["id", "vector", "token_count", "truncated"]
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 64)


def test_shard_names_do_not_depend_on_the_input_files_names(tmp_path: Path, spec: ServerConfig) -> None:
    """Inputs named like the output folder's own files (a leftover temporary, a hidden file) are shards like
    any other: counted complete, never deleted, and a rerun finds nothing to do."""
    inputs = [
        write_jsonl(tmp_path / f"{TEMPORARY_PREFIX}abstracts.jsonl", corpus_records(7)),
        write_jsonl(tmp_path / "_manifest.jsonl", corpus_records(5)),
    ]
    output = tmp_path / "out"
    summary = embed_corpus([str(path) for path in inputs], str(output), engine=spec, rows_per_shard=4, **ACTOR)
    assert (summary.shards_written, summary.shards_total) == (4, 4)
    assert sorted(completed_shards(str(output))) == [f"shard-{n:08d}" for n in range(4)]
    rerun = embed_corpus([str(path) for path in inputs], str(output), engine=spec, rows_per_shard=4, **ACTOR)
    assert (rerun.shards_written, rerun.shards_skipped) == (0, 4)
    assert len(all_rows(output)[0]) == 12


def test_a_rerun_of_a_complete_run_embeds_nothing(shards: Path, corpus: Path, spec: ServerConfig) -> None:
    summary = embed_corpus(str(corpus), str(shards), engine=spec, rows_per_shard=20, **ACTOR)
    assert (summary.rows, summary.shards_written, summary.shards_skipped) == (0, 0, 5)


def test_a_killed_actor_is_replaced_and_the_output_is_complete_exactly_once(
    tmp_path: Path, corpus: Path, spec: ServerConfig
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
    tmp_path: Path, corpus: Path, spec: ServerConfig
) -> None:
    output = tmp_path / "out"
    actors: set[int] = set()

    def interrupt_after_two(row: dict[str, Any]) -> None:
        actors.add(int(row["pid"]))
        if len(completed_shards(str(output))) >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_corpus(str(corpus), str(output), engine=spec, rows_per_shard=6, on_shard=interrupt_after_two, **ACTOR)
    # embed_corpus stops the run's actors as it leaves: once their process is gone, no shard can appear.
    wait_for(lambda: not any(alive(pid) for pid in actors), message="an interrupted run's actor lives on")
    before = {p.name: p.stat().st_mtime_ns for p in output.glob("*.parquet")}
    assert 2 <= len(before) < 15
    summary = embed_corpus(str(corpus), str(output), engine=spec, rows_per_shard=6, **ACTOR)
    assert summary.shards_skipped == len(before) and summary.shards_written == 15 - len(before)
    assert {name: (output / name).stat().st_mtime_ns for name in before} == before  # untouched
    ids, _, _ = all_rows(output)
    assert sorted(ids) == sorted(r["_id"] for r in corpus_records()) and len(ids) == ROWS


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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


def test_a_missing_column_is_named_before_anything_is_written(tmp_path: Path, spec: ServerConfig) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "body": "no text field"}])
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: no 'text' field"):
        embed_corpus(str(corpus), str(tmp_path / "out"), engine=spec, **ACTOR)
    table = pa.table({"_id": ["a"], "abstract": ["x"]})
    pq.write_table(table, tmp_path / "c.parquet")
    with pytest.raises(CorpusError, match=r"c\.parquet.*no 'text' field"):
        embed_corpus(str(tmp_path / "c.parquet"), str(tmp_path / "out"), engine=spec, **ACTOR)
    assert nothing_written(tmp_path / "out") and not (tmp_path / "out" / MANIFEST).exists()


def test_a_bad_record_mid_run_fails_its_shard_and_the_run_cannot_be_loaded(tmp_path: Path, spec: ServerConfig) -> None:
    records = corpus_records(30)
    del records[25]["text"]
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    output = tmp_path / "out"
    with pytest.raises(CorpusError, match=r"c\.jsonl:26: no 'text' field"):
        embed_corpus(str(corpus), str(output), engine=spec, rows_per_shard=10, **ACTOR)
    assert "shard-00000002" not in completed_shards(str(output))
    with pytest.raises(ShardsError, match="incomplete"):
        load_shards(str(output), "papers", EmbeddedIndex(tmp_path / "data"), progress=False)


def test_an_unreadable_file_is_refused(tmp_path: Path, spec: ServerConfig) -> None:
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
    tmp_path: Path, corpus: Path, spec: ServerConfig
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


def test_a_rerun_with_other_settings_is_refused(tmp_path: Path, shards: Path, corpus: Path, spec: ServerConfig) -> None:
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


def test_an_empty_text_fails_its_shard_naming_the_record_in_the_servers_words(
    tmp_path: Path, spec: ServerConfig
) -> None:
    records = corpus_records(8)
    records[5]["text"] = "  "
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    with pytest.raises(CorpusError, match=r"c\.jsonl:6: must not be empty or whitespace only"):
        embed_corpus(str(corpus), str(tmp_path / "out"), engine=spec, **ACTOR)


def test_load_validates_passages_as_upserts_do_naming_the_record(tmp_path: Path, spec: ServerConfig) -> None:
    """A corpus with an id twice in one batch is refused as UpsertPassages refuses it, naming the record,
    not turned into a database error; nothing of that batch is stored."""
    records = corpus_records(6)
    records[4]["_id"] = records[1]["_id"]
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    embed_corpus(str(corpus), str(tmp_path / "out"), engine=spec, **ACTOR)
    store = EmbeddedIndex(tmp_path / "data")
    try:
        with pytest.raises(CorpusError, match=r"c\.jsonl:5: id: duplicate id 'doc-1'") as refused:
            load_shards(str(tmp_path / "out"), "papers", store, progress=False)
        assert refused.value.code.name == "INVALID_ARGUMENT"
        assert store.get_collection("papers").passage_count == 0
    finally:
        store.close()


def test_the_fleet_retries_only_what_can_succeed() -> None:
    """A full queue (RESOURCE_EXHAUSTED with the server's retry delay) and an unavailable server are retried;
    a message or text too large for the server (RESOURCE_EXHAUSTED without one) and bad input are not."""
    from google.protobuf import duration_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2

    def error(code: int, delay: float | None = None) -> Exception:
        status = status_pb2.Status(code=code, message="from the server")
        if delay is not None:
            retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=int(delay * 1e9)))
            status.details.add().Pack(retry)
        return errors.from_status(status)

    full_queue = error(code_pb2.RESOURCE_EXHAUSTED, delay=0.5)
    too_large = error(code_pb2.RESOURCE_EXHAUSTED)
    assert isinstance(full_queue, ResourceExhaustedError) and isinstance(too_large, ResourceExhaustedError)
    assert retryable(full_queue) and retryable(error(code_pb2.UNAVAILABLE))
    assert isinstance(error(code_pb2.UNAVAILABLE), UnavailableError)
    assert not retryable(too_large)
    assert not retryable(error(code_pb2.INVALID_ARGUMENT)) and not retryable(error(code_pb2.INTERNAL))


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
        [*cli, "embed", "--engine", "ray", "--model", str(minilm_dir), "--type", "passage",
         "--input", str(subset / "corpus.jsonl"),
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
         "--matryoshka-dims", TINY_MATRYOSHKA, "--dimensions", "48", "--type", "passage", "--input", str(corpus),
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "scholarembed embed: error: INVALID_ARGUMENT: dimensions: 48 is not one of [64, 32, 16]" in result.stderr
    assert "Traceback" not in result.stderr
