"""What the README and the documentation site (docs/) promise and no other test exercised, each end to end
on a real server over a socket, or against the code that keeps the promise.

The documents themselves: the README stays short and its links resolve, every `scholarembed` command line
they show parses with the real command line, every serve flag is on the configuration page, the defaults
they state are serve's, and the milvus extra brings what `--index-uri ./milvus.db` needs.
Flags and limits (--max-concurrent-rpcs, --max-message-bytes, --max-tokens, --dtype, SCHOLAREMBED_<FLAG>
and flag precedence, --log-format json with request ids), the store's refusals (FAILED_PRECONDITION,
DATA_LOSS), the CLI's resumable `index` and its `search`, the client's connection options, and model
folders with CLS pooling and Dense layers with a bias and an activation.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tomllib
import torch
from conftest import TINY_MATRYOSHKA, ServerProcess, wait_for
from reference import ModelCard, card_query, cosine
from safetensors.torch import load_file, save_file
from tiny_model import WORDS, build_tiny_embeddinggemma

import scholarembed
from scholarembed import Client, Passage
from scholarembed.v1 import embedding_pb2 as pb
from scholarembed.v1 import embedding_pb2_grpc as pb_grpc
from scholarembed.v1 import search_pb2 as spb
from scholarembed.v1 import search_pb2_grpc as spb_grpc
from scholarembed_server import config as server_config
from scholarembed_server.cli import build_parser
from scholarembed_server.engine import EmbeddingEngine
from scholarembed_server.index.base import IndexKind, StoredPassage, VectorStorage
from scholarembed_server.index.embedded import EmbeddedIndex
from scholarembed_server.model.prompts import InputType


class GatedRunner:
    """The real engine's runner; forward passes beyond the first `free_passes` wait at a gate the test opens."""

    def __init__(self, engine: EmbeddingEngine, free_passes: int = 0) -> None:
        self._runner = engine.runner
        self.engine = EmbeddingEngine(engine.model, self)  # type: ignore[arg-type]  # the engine around this runner
        self.free_passes = free_passes
        self.passes = 0
        self.gate = threading.Event()
        self.held = threading.Semaphore(0)  # released each time a forward pass stops at the gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def launch(self, batch: Any) -> Any:
        self.passes += 1
        if self.passes > self.free_passes and not self.gate.is_set():
            self.held.release()
            assert self.gate.wait(120)
        return self._runner.launch(batch)


def corpus(count: int, prefix: str = "p") -> list[Passage]:
    return [
        Passage(id=f"{prefix}{i}", title=WORDS[i % 11] if i % 2 else "", text=" ".join(WORDS[i % 40 : i % 40 + 8]))
        for i in range(count)
    ]


def run_cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scholarembed_server", *args], capture_output=True, text=True, timeout=300, **kwargs
    )


# -- limits --------------------------------------------------------------------------------------------


def test_calls_beyond_max_concurrent_rpcs_are_resource_exhausted(tiny_engine, in_process_server) -> None:
    engine = GatedRunner(tiny_engine)
    server = in_process_server(engine=engine.engine, max_concurrent_rpcs=2, max_wait_ms=0)
    request = pb.EmbedRequest(texts=["protein"], input_type=pb.INPUT_TYPE_QUERY)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        in_progress = [stub.Embed.future(request)]
        assert engine.held.acquire(timeout=60)  # the first call is in the forward pass
        in_progress.append(stub.Embed.future(request))
        queued = server.server.metrics.registry.get_sample_value
        wait_for(lambda: queued("scholarembed_queue_requests") == 1, message="the second call never queued")
        with pytest.raises(grpc.RpcError) as raised:
            stub.Embed(request, timeout=60)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        engine.gate.set()
        assert all(len(call.result(timeout=60).embeddings) == 1 for call in in_progress)
        assert len(stub.Embed(request, timeout=60).embeddings) == 1  # room again once they finished


@pytest.fixture(scope="module")
def configured_server(tmp_path_factory, tiny_model_dir):
    """`scholarembed serve` configured by environment variables, some of them overridden by flags."""
    environment = {
        "SCHOLAREMBED_MAX_TOKENS": "24",  # no flag: the variable applies
        "SCHOLAREMBED_MATRYOSHKA_DIMS": TINY_MATRYOSHKA,
        "SCHOLAREMBED_LOG_FORMAT": "json",
        "SCHOLAREMBED_MAX_TEXTS_PER_REQUEST": "7",  # the flag below wins
        "SCHOLAREMBED_DTYPE": "float16",  # the flag below wins
        "SCHOLAREMBED_MAX_BATCH_TOKENS": "512",
        "SCHOLAREMBED_INDEX_KIND": "hnsw",
    }
    folder = tmp_path_factory.mktemp("configured")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        patch.setenv("SCHOLAREMBED_DATA_DIR", str(folder / "data"))
        server = ServerProcess(
            folder, "--model", str(tiny_model_dir),
            "--max-texts-per-request", "9", "--dtype", "bfloat16", "--max-message-bytes", "2048",
        )  # fmt: skip
    yield server
    server.stop()


def test_environment_variables_set_flags_and_a_flag_wins_over_its_variable(configured_server) -> None:
    with Client(configured_server.address) as client:
        info = client.model_info()
        assert info.max_tokens == 24  # SCHOLAREMBED_MAX_TOKENS
        assert info.matryoshka_dimensions == (64, 32, 16)  # SCHOLAREMBED_MATRYOSHKA_DIMS
        assert info.dtype == "bfloat16"  # --dtype over SCHOLAREMBED_DTYPE=float16
        assert info.max_texts_per_request == 9  # --max-texts-per-request over SCHOLAREMBED_MAX_TEXTS_PER_REQUEST=7
        assert (info.max_batch_tokens, info.max_message_bytes) == (512, 2048)
        client.upsert_passages("configured", corpus(3))  # SCHOLAREMBED_DATA_DIR enabled SearchService
        assert client.get_collection("configured").index_kind == "hnsw"  # SCHOLAREMBED_INDEX_KIND
        # 8 texts > 7: the variable is not in force (16 dimensions keep the response under 2,048 bytes).
        assert client.embed_queries(["protein"] * 8, dimensions=16).shape == (8, 16)
        with pytest.raises(scholarembed.InvalidArgumentError, match="limit of 9"):
            client.embed_queries(["protein"] * 10, dimensions=16)


def test_environment_defaults_and_flag_precedence_for_every_kind_of_flag(monkeypatch) -> None:
    monkeypatch.setenv("SCHOLAREMBED_MAX_WAIT_MS", "7.5")
    monkeypatch.setenv("SCHOLAREMBED_AUTH_OPEN_PROBES", "true")
    monkeypatch.setenv("SCHOLAREMBED_INDEX_KIND", "hnsw")
    monkeypatch.setenv("SCHOLAREMBED_GRACE_S", "3")
    import argparse

    parser = argparse.ArgumentParser()
    server_config.add_arguments(parser)
    from_environment = server_config.from_arguments(parser.parse_args([]))
    assert (from_environment.max_wait_ms, from_environment.auth_open_probes) == (7.5, True)
    assert (from_environment.index_kind, from_environment.grace_s) == ("hnsw", 3.0)
    flags = server_config.from_arguments(
        parser.parse_args(["--max-wait-ms", "1", "--no-auth-open-probes", "--index-kind", "ivf", "--grace-s", "9"])
    )
    assert (flags.max_wait_ms, flags.auth_open_probes, flags.index_kind, flags.grace_s) == (1.0, False, "ivf", 9.0)


def test_max_tokens_truncates_and_flags_or_refuses_longer_texts(configured_server, tiny_model_dir) -> None:
    long_text = " ".join(WORDS[:40])
    with Client(configured_server.address) as client:
        result = client.embed([long_text, "protein gene"], input_type="raw")
        assert result.token_counts[0] == 24 and result.truncated == [True, False]
        with pytest.raises(scholarembed.InvalidArgumentError) as raised:
            client.embed([long_text], input_type="raw", truncation="error")
        assert raised.value.field_violations[0].field == "texts[0]"
    # The truncated vector is the model card's over the first 24 tokens (bfloat16 here, so not to 1e-5).
    expected = ModelCard(tiny_model_dir, max_length=24).embed(long_text)
    untruncated = ModelCard(tiny_model_dir).embed(long_text)
    assert cosine(result.vectors[0], expected)[0] >= 0.999
    assert cosine(result.vectors[0], untruncated)[0] < cosine(result.vectors[0], expected)[0]


def test_dtype_bfloat16_serves_vectors_close_to_float32(configured_server, tiny_model_dir) -> None:
    texts = ["protein", " ".join(WORDS[:15]), "tumor cell immune response"]
    card = ModelCard(tiny_model_dir, max_length=24)  # the server's --max-tokens
    with Client(configured_server.address) as client:
        assert client.model_info().dtype == "bfloat16"
        vectors = client.embed_queries(texts)
    expected = [card.embed(card_query(t)) for t in texts]
    assert cosine(vectors, expected).min() >= 0.999  # bfloat16 is close to float32, not equal
    assert cosine(vectors, expected).min() < 0.999999


def test_a_response_larger_than_max_message_bytes_is_resource_exhausted(configured_server) -> None:
    with grpc.insecure_channel(configured_server.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        small = pb.EmbedRequest(texts=["protein"] * 9, input_type=pb.INPUT_TYPE_QUERY)  # a 60-byte request
        assert small.ByteSize() < 2048
        with pytest.raises(grpc.RpcError) as raised:
            stub.Embed(small, timeout=60)  # 9 x 64 float32: a response of over 2,048 bytes
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(stub.Embed(pb.EmbedRequest(texts=["protein"], input_type=pb.INPUT_TYPE_QUERY)).embeddings) == 1


def test_json_logs_carry_request_ids_and_callers_get_them_back(configured_server) -> None:
    def failed_embeds() -> list[dict[str, Any]]:
        entries = [json.loads(line) for line in configured_server.output().splitlines() if line.startswith("{")]
        return [e for e in entries if e.get("rpc") == "Embed" and e.get("code") == "INVALID_ARGUMENT"]

    earlier = len(failed_embeds())  # other tests' failed calls on this server were logged too
    bad = pb.EmbedRequest(texts=["protein"])  # no input_type: logged as a warning with its request id
    with grpc.insecure_channel(configured_server.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for metadata in ((("x-request-id", "trace-readme-42"),), ()):
            with pytest.raises(grpc.RpcError):
                stub.Embed(bad, metadata=metadata, timeout=60)
    wait_for(lambda: len(failed_embeds()) >= earlier + 2, message="no JSON log lines for the two failed calls")
    echoed, generated = failed_embeds()[earlier : earlier + 2]
    assert echoed["request_id"] == "trace-readme-42"  # the caller's x-request-id
    assert re.fullmatch(r"[0-9a-f]{16}", generated["request_id"])  # made up when the caller sends none
    # The caller gets the id back in the trailing metadata, on errors (next to the status details) and
    # on success, unary and streaming alike.
    with grpc.insecure_channel(configured_server.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Embed(bad, metadata=(("x-request-id", "trace-readme-43"),), timeout=60)
        trailers = dict(raised.value.trailing_metadata())
        assert trailers["x-request-id"] == "trace-readme-43" and "grpc-status-details-bin" in trailers
        good = pb.EmbedRequest(texts=["protein"], input_type=pb.INPUT_TYPE_QUERY)
        _, call = stub.Embed.with_call(good, metadata=(("x-request-id", "trace-readme-44"),), timeout=60)
        assert dict(call.trailing_metadata())["x-request-id"] == "trace-readme-44"
        stream = stub.EmbedStream(iter([pb.EmbedStreamRequest(request_id="s", request=good)]), timeout=60)
        assert [r.request_id for r in stream] == ["s"]
        assert re.fullmatch(r"[0-9a-f]{16}", dict(stream.trailing_metadata())["x-request-id"])
    # The typed client names that id in its exceptions, so a failure can be found in the server's log.
    with Client(configured_server.address) as client, pytest.raises(scholarembed.InvalidArgumentError) as failed:
        client.embed_queries(["protein"], dimensions=7)
    server_id = failed.value.server_request_id
    assert re.fullmatch(r"[0-9a-f]{16}", server_id) and f"server request id {server_id}" in str(failed.value)

    async def failed_async_call() -> scholarembed.ScholarEmbedError:
        async with scholarembed.AsyncClient(configured_server.address) as client:
            try:
                await client.embed_queries(["protein"], dimensions=7)
            except scholarembed.InvalidArgumentError as error:
                return error
        raise AssertionError("the call did not fail")

    assert re.fullmatch(r"[0-9a-f]{16}", asyncio.run(failed_async_call()).server_request_id or "")
    wait_for(
        lambda: any(json.loads(line).get("request_id") == server_id for line in configured_server.output().splitlines()
                    if line.startswith("{")),
        message=f"no server log line for request {server_id}",
    )  # fmt: skip
    entries = [json.loads(line) for line in configured_server.output().splitlines() if line.startswith("{")]
    assert any("serving" in e["message"] for e in entries)  # start-up lines are JSON as well
    assert all({"time", "level", "logger", "request_id", "message"} <= e.keys() for e in entries)


# -- the client's connection options ---------------------------------------------------------------


def test_client_max_message_bytes_channel_options_and_dns_targets(in_process_server) -> None:
    server = in_process_server()
    twelve = ["protein"] * 12  # a response of about 3 kB
    with Client(server.address, max_message_bytes=1024) as client:
        assert client.embed_queries(["protein"]).shape == (1, 64)
        with pytest.raises(scholarembed.ResourceExhaustedError, match="larger than max"):
            client.embed_queries(twelve)
        with pytest.raises(scholarembed.ResourceExhaustedError):
            client.embed_queries(["protein " * 300])  # a request over the limit is not even sent
    options = [("grpc.max_receive_message_length", 1024)]  # replaces the client's own default
    with (
        Client(server.address, channel_options=options) as client,
        pytest.raises(scholarembed.ResourceExhaustedError, match="larger than max"),
    ):
        client.embed_queries(twelve)
    with Client(f"dns:///localhost:{server.port}") as client:
        assert client.embed_queries(twelve).shape == (12, 64)


# -- the store's refusals ----------------------------------------------------------------------------


def test_a_collection_of_another_model_or_dimension_is_failed_precondition(
    tmp_path, tiny_engine, in_process_server
) -> None:
    store = EmbeddedIndex(tmp_path / "data")
    for name, dimensions, model in (("other-model", 64, "someone/else"), ("other-width", 32, tiny_engine.model_id)):
        store.create_collection(
            name, dimensions=dimensions, model=model, index_kind=IndexKind.FLAT, vector_storage=VectorStorage.FLOAT32
        )
        vectors = np.random.default_rng(0).normal(size=(3, dimensions)).astype(np.float32)
        store.upsert(name, [StoredPassage(f"x{i}", "", "text") for i in range(3)], vectors)
    store.close()
    server = in_process_server(data_dir=str(tmp_path / "data"))
    with Client(server.address) as client:
        for name in ("other-model", "other-width"):
            with pytest.raises(scholarembed.ScholarEmbedError) as raised:
                client.search("protein", collection=name)
            assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert name in str(raised.value) and tiny_engine.model_id in str(raised.value)
            with pytest.raises(scholarembed.ScholarEmbedError) as raised:
                client.upsert_passages(name, [Passage(id="new", text="protein")])
            assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert client.get_passages(name, ["new"]) == []  # nothing of the refused upsert was stored
            assert client.get_collection(name).passage_count == 3
        client.upsert_passages("mine", corpus(5))  # collections of this model are served as usual
        assert len(client.search("protein", collection="mine", top_k=5)) == 5


def test_an_inconsistent_collection_is_data_loss_and_the_rest_is_served(
    tmp_path, tiny_engine, in_process_server
) -> None:
    data = str(tmp_path / "data")
    first = in_process_server(data_dir=data)
    with Client(first.address) as client:
        client.upsert_passages("intact", corpus(20))
        client.upsert_passages("damaged", corpus(20))
        before = client.search_many(["protein", "tumor"], collection="intact", top_k=5)
    first.stop()
    vectors = tmp_path / "data" / "damaged" / "vectors.bin"
    with vectors.open("r+b") as file:
        file.truncate(vectors.stat().st_size // 2)  # committed rows without their vectors: beyond repair

    server = in_process_server(data_dir=data)
    with grpc.insecure_channel(server.address) as channel:
        stub = spb_grpc.SearchServiceStub(channel)
        for call, request in (
            (stub.Search, spb.SearchRequest(collection="damaged", queries=["protein"], top_k=3)),
            (stub.GetPassages, spb.GetPassagesRequest(collection="damaged", ids=["p1"])),
            (stub.GetCollection, spb.GetCollectionRequest(name="damaged")),
        ):
            with pytest.raises(grpc.RpcError) as raised:
                call(request, timeout=60)
            assert raised.value.code() == grpc.StatusCode.DATA_LOSS, call
            assert "damaged" in raised.value.details()
        upsert = spb.UpsertPassagesRequest(
            collection="damaged", request_id="1", passages=[spb.Passage(id="n", text="protein")]
        )
        [response] = list(stub.UpsertPassages(iter([upsert]), timeout=60))
        assert response.error.code == grpc.StatusCode.DATA_LOSS.value[0]
    with Client(server.address) as client:
        assert [c.name for c in client.list_collections()] == ["intact"]
        after = client.search_many(["protein", "tumor"], collection="intact", top_k=5)
        assert [[h.id for h in hits] for hits in after] == [[h.id for h in hits] for hits in before]
        assert client.upsert_passages("intact", corpus(3, prefix="new")) == 3


# -- the command line --------------------------------------------------------------------------------


def write_jsonl(path: Path, passages: list[Passage]) -> None:
    path.write_text("".join(json.dumps({"_id": p.id, "title": p.title, "text": p.text}) + "\n" for p in passages))


def test_index_interrupted_then_run_again_upserts_only_the_rest(tmp_path, tiny_engine, in_process_server) -> None:
    engine = GatedRunner(tiny_engine, free_passes=3)
    server = in_process_server(engine=engine.engine, data_dir=str(tmp_path / "data"))
    passages = corpus(300)
    write_jsonl(tmp_path / "corpus.jsonl", passages)
    command = ["index", "--corpus", str(tmp_path / "corpus.jsonl"), "--collection", "resumed"]
    command += ["--server", server.address, "--batch-size", "10", "--no-progress"]
    metric = server.server.metrics.registry.get_sample_value
    with Client(server.address) as client:
        interrupted = subprocess.Popen(
            [sys.executable, "-m", "scholarembed_server", *command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert engine.held.acquire(timeout=120)  # three forward passes done, the fourth held
            wait_for(lambda: client.get_collection("resumed").passage_count > 0, message="nothing committed")
        finally:
            interrupted.send_signal(signal.SIGKILL)
            interrupted.wait(60)
        cancelled = {"rpc": "UpsertPassages", "code": "CANCELLED", "door": "grpc"}
        wait_for(lambda: metric("scholarembed_request_duration_seconds_count", cancelled) == 1)
        engine.gate.set()
        wait_for(lambda: server.server.batcher.queued_tokens == 0, message="the killed run's work stayed queued")
        client.delete_passages("resumed", ["no such id"])  # runs after any commit in progress: writes are serial
        stored = {p.id for p in client.get_passages("resumed", [p.id for p in passages])}
        assert 0 < len(stored) < len(passages)  # a real interruption: part of the corpus is in

        # vectors.bin is append-only, a row per upserted passage (replacements too): it counts what was written.
        vectors = tmp_path / "data" / "resumed" / "vectors.bin"
        row_bytes = 64 * 2  # float16 storage
        rows_before = vectors.stat().st_size // row_bytes
        get_passages_ok = {"rpc": "GetPassages", "code": "OK", "door": "grpc"}
        lookups_before = metric("scholarembed_request_duration_seconds_count", get_passages_ok)
        resumed = run_cli(*command, check=True)
        assert vectors.stat().st_size // row_bytes - rows_before == len(passages) - len(stored)
        lookups = metric("scholarembed_request_duration_seconds_count", get_passages_ok)
        assert lookups > lookups_before  # it asked the server which ids are stored
        assert f"upserted {len(passages) - len(stored)}; 'resumed' holds {len(passages)} passages" in resumed.stderr
        assert {p.id for p in client.get_passages("resumed", [p.id for p in passages])} == {p.id for p in passages}


def test_search_command_prints_the_servers_ranking(tmp_path, in_process_server) -> None:
    server = in_process_server(data_dir=str(tmp_path / "data"))
    with Client(server.address) as client:
        client.upsert_passages("papers", corpus(40))
        expected = client.search("tumor cell survival", collection="papers", top_k=5, dimensions=32)
    output = run_cli(
        "search", "tumor cell survival", "--collection", "papers", "--server", server.address,
        "--top-k", "5", "--dimensions", "32", check=True,
    ).stdout  # fmt: skip
    header, *rows = output.splitlines()
    assert header.split()[:3] == ["rank", "score", "id"]
    printed = [row.split()[:3] for row in rows]
    assert [int(rank) for rank, _, _ in printed] == [1, 2, 3, 4, 5]
    assert [hit_id for _, _, hit_id in printed] == [hit.id for hit in expected]
    np.testing.assert_allclose([float(score) for _, score, _ in printed], [h.score for h in expected], atol=5e-5)
    by_id = {p.id: p for p in corpus(40)}
    for row, hit in zip(rows, expected, strict=True):
        assert by_id[hit.id].text[:20] in row  # the passage's text is shown


def test_search_command_reports_an_unknown_collection(in_process_server, tmp_path) -> None:
    server = in_process_server(data_dir=str(tmp_path / "data"))
    result = run_cli("search", "protein", "--collection", "missing", "--server", server.address)
    assert result.returncode != 0
    assert "NOT_FOUND" in result.stderr and "missing" in result.stderr


# -- model folders: CLS pooling, Dense layers with bias and activation ----------------------------------


@pytest.fixture(scope="module")
def cls_tanh_model_dir(tmp_path_factory) -> Path:
    """The tiny model with CLS pooling and Dense layers that have a bias and a Tanh / GELU activation."""
    folder = build_tiny_embeddinggemma(tmp_path_factory.mktemp("cls") / "tiny-cls-tanh", seed=3)
    pooling_path = folder / "1_Pooling" / "config.json"
    pooling = json.loads(pooling_path.read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    pooling_path.write_text(json.dumps(pooling))
    generator = torch.Generator().manual_seed(4)
    for module, activation in (("2_Dense", "Tanh"), ("3_Dense", "GELU")):
        config_path = folder / module / "config.json"
        config = json.loads(config_path.read_text())
        config.update(bias=True, activation_function=f"torch.nn.modules.activation.{activation}")
        config_path.write_text(json.dumps(config))
        tensors = load_file(str(folder / module / "model.safetensors"))
        tensors["linear.bias"] = 0.5 * torch.randn(config["out_features"], generator=generator)
        save_file(tensors, str(folder / module / "model.safetensors"))
    return folder


def test_cls_pooling_and_dense_bias_and_activation_match_independent_oracles(
    cls_tanh_model_dir, in_process_server
) -> None:
    from sentence_transformers import SentenceTransformer

    engine = EmbeddingEngine.load(str(cls_tanh_model_dir))
    assert engine.model.pooling == "cls"
    texts = ["protein", " ".join(WORDS[:30]), "tumor cell immune response", " ".join(reversed(WORDS[:12]))]
    card = ModelCard(cls_tanh_model_dir, max_length=128)
    expected = np.stack([card.embed(t) for t in texts])
    reference = SentenceTransformer(str(cls_tanh_model_dir), device="cpu").encode(texts, normalize_embeddings=True)
    assert cosine(expected, reference).min() >= 0.99999  # the two oracles agree with each other
    assert cosine(engine.encode(texts, InputType.RAW).vectors, expected).min() >= 0.99999
    # Not vacuous: the same weights without the biases and activations, or with mean pooling, differ.
    card.dense = [(weight, None, torch.nn.Identity()) for weight, _, _ in card.dense]
    assert cosine(np.stack([card.embed(t) for t in texts]), expected).max() < 0.99
    card.cls_pooling = False
    assert cosine(np.stack([card.embed(t) for t in texts]), expected).max() < 0.99
    server = in_process_server(engine=engine)
    with Client(server.address) as client:
        assert cosine(client.embed(texts, input_type="raw").vectors, expected).min() >= 0.99999


# -- the documents -----------------------------------------------------------------------------------

REPO = Path(__file__).parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_the_readme_is_short_and_every_link_in_it_resolves() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 220  # what it is, the two commands, one example per door, links
    targets = re.findall(r"\]\(([^)#\s]+)[^)]*\)", readme)
    local = [target for target in targets if not target.startswith(("http://", "https://"))]
    assert "docs/index.md" in local and "docs/quickstart.md" in local
    assert [target for target in local if not (REPO / target).exists()] == []


def documented_command_lines() -> list[tuple[str, list[str]]]:
    """Every `scholarembed ...` line of the documents' code blocks (continuations joined), as argv."""
    lines = []
    for document in DOCUMENTS:
        in_code = False
        pending = ""
        for line in document.read_text().splitlines():
            if line.lstrip().startswith("```"):
                in_code = not in_code
                continue
            if not in_code:
                continue
            line = pending + line.split(" #")[0].strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            command = re.sub(r"^(SCHOLAREMBED_\w+=\S+ )+", "", line)
            if command.startswith("scholarembed ") and "..." not in command:
                lines.append((document.name, shlex.split(command)[1:]))
    return lines


def test_every_command_line_in_the_documents_parses(capsys) -> None:
    commands = documented_command_lines()
    shown = {argv[0] for _, argv in commands}
    assert {"serve", "index", "search", "eval", "embed", "load", "info"} <= shown
    parser = build_parser()
    for document, argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{document}: `scholarembed {shlex.join(argv)}` does not parse: {capsys.readouterr().err}")


def test_every_serve_flag_is_on_the_configuration_page() -> None:
    page = (REPO / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `(--[a-z-]+)`(?: / `(--[a-z-]+)`)?", page, re.MULTILINE))
    documented_flags = {flag for pair in documented for flag in pair if flag}
    [serve] = [
        action.choices["serve"] for action in build_parser()._actions if isinstance(action.choices, dict)
    ]  # fmt: skip
    flags = {option for action in serve._actions for option in action.option_strings if option.startswith("--")}
    missing = flags - documented_flags - {"--help", "--port-file", "--no-auth-open-probes"}
    assert missing == set(), f"serve flags not on docs/configuration.md: {sorted(missing)}"


def test_the_defaults_the_documents_state_are_serves(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    for name in ("HTTP_PORT", "METRICS_PORT", "DATA_DIR", "PORT", "HOST"):
        monkeypatch.delenv(f"SCHOLAREMBED_{name}", raising=False)
    import argparse

    parser = argparse.ArgumentParser()
    server_config.add_arguments(parser)
    defaults = server_config.from_arguments(parser.parse_args([]))
    assert (defaults.host, defaults.port, defaults.http_port, defaults.metrics_port) == ("127.0.0.1", 50051, 8080, 9464)
    assert defaults.data_dir == str(tmp_path / ".local" / "share" / "scholarembed")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert server_config.default_data_dir() == tmp_path / "xdg" / "scholarembed"
    stated = "".join(document.read_text() for document in (REPO / "README.md", REPO / "docs" / "quickstart.md"))
    for fact in ("127.0.0.1:50051", "http://127.0.0.1:8080/", "http://127.0.0.1:9464/metrics",
                 "~/.local/share/scholarembed", "--no-http", "--no-metrics", "--no-index"):  # fmt: skip
        assert fact in stated
    off = server_config.from_arguments(parser.parse_args(["--no-http", "--no-metrics", "--no-index"]))
    assert (off.http_port, off.metrics_port, off.data_dir, off.index_uri) == (None, None, None, None)


def test_the_milvus_extra_brings_what_a_milvus_lite_file_needs() -> None:
    from packaging.requirements import Requirement

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    requirements = {Requirement(line).name: Requirement(line) for line in extras["milvus"]}
    providers = importlib.metadata.packages_distributions()
    # The modules serve checks for `--index-uri ./milvus.db` are installed by the extra's distributions ...
    for module in ("pymilvus", "milvus_lite"):
        assert {name.lower() for name in providers[module]} & set(requirements), module
    # ... at versions the extra allows (the ones the Milvus contract tests run here).
    for name, requirement in requirements.items():
        assert requirement.specifier.contains(importlib.metadata.version(name)), requirement
    assert server_config.missing_extra(server_config.ServerConfig(index_uri="papers.db", http_port=None)) is None
