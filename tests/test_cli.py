"""The `scholarembed` command line: bulk encoding through a server and in-process, SIGTERM, light imports."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import grpc
import numpy as np
from conftest import TINY_MATRYOSHKA, ServerProcess
from reference import ModelCard, cosine
from tiny_model import WORDS

from scholarembed import Client
from scholarembed.v1 import embedding_pb2 as pb
from scholarembed.v1 import embedding_pb2_grpc as pb_grpc


def write_corpus(path, count: int = 150) -> list[dict[str, str]]:
    records = [
        {"_id": str(i), "title": f"{WORDS[i % 7]} study" if i % 3 else "", "text": " ".join(WORDS[i % 40 : i % 40 + 9])}
        for i in range(count)
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return records


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scholarembed_server", *args], capture_output=True, text=True, timeout=300, check=True
    )


def test_embed_file_through_the_server(tmp_path, tiny_server) -> None:
    records = write_corpus(tmp_path / "corpus.jsonl")
    output = tmp_path / "vectors.npy"
    run_cli(
        "embed", "--input", str(tmp_path / "corpus.jsonl"), "--output", str(output), "--type", "passage",
        "--dimensions", "32", "--server", tiny_server.address, "--batch-size", "16", "--no-progress",
    )  # fmt: skip
    vectors = np.load(output)
    with Client(tiny_server.address) as client:
        expected = np.concatenate(
            [
                client.embed_passages([r["text"] for r in chunk], [r["title"] for r in chunk], dimensions=32)
                for chunk in (records[i : i + 50] for i in range(0, len(records), 50))
            ]
        )
    assert vectors.shape == (len(records), 32) and vectors.dtype == np.float32
    assert cosine(vectors, expected).min() >= 0.99999


def test_embed_file_in_process_matches_the_server(tmp_path, tiny_server, tiny_model_dir) -> None:
    texts = [" ".join(WORDS[i : i + 5]) for i in range(30)]
    (tmp_path / "queries.txt").write_text("\n".join(texts) + "\n")
    output = tmp_path / "queries.npy"
    run_cli(
        "embed", "--input", str(tmp_path / "queries.txt"), "--output", str(output), "--type", "query",
        "--model", str(tiny_model_dir), "--no-progress",
    )  # fmt: skip
    with Client(tiny_server.address) as client:
        expected = client.embed_queries(texts)
    assert cosine(np.load(output), expected).min() >= 0.99999


def test_embed_in_process_loads_the_engine_from_serves_settings(tmp_path, tiny_model_dir) -> None:
    """--max-tokens, --matryoshka-dims and the rest are serve's flags, read into the same ServerConfig: a
    text is cut where a server started with them would cut it."""
    texts = [" ".join(WORDS[i : i + 40]) for i in range(3)]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    run_cli(
        "embed", "--input", str(tmp_path / "texts.txt"), "--output", str(tmp_path / "v.npy"), "--type", "raw",
        "--model", str(tiny_model_dir), "--max-tokens", "16", "--matryoshka-dims", "64,24", "--dimensions", "24",
        "--no-progress",
    )  # fmt: skip
    card = ModelCard(tiny_model_dir, max_length=16)
    assert cosine(np.load(tmp_path / "v.npy"), [card.embed(text, 24) for text in texts]).min() >= 0.99999


def test_embed_requires_the_input_type(tmp_path, tiny_model_dir) -> None:
    (tmp_path / "texts.txt").write_text("protein\n")
    result = subprocess.run(
        [sys.executable, "-m", "scholarembed_server", "embed", "--input", str(tmp_path / "texts.txt"),
         "--output", str(tmp_path / "v.npy"), "--model", str(tiny_model_dir)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "the following arguments are required: --type" in result.stderr


def test_a_bad_record_is_named_in_one_line(tmp_path, tiny_model_dir) -> None:
    (tmp_path / "c.jsonl").write_text('{"text": "protein"}\n\n{"text": " "}\n')
    result = subprocess.run(
        [sys.executable, "-m", "scholarembed_server", "embed", "--input", str(tmp_path / "c.jsonl"),
         "--output", str(tmp_path / "v.npy"), "--model", str(tiny_model_dir), "--type", "passage", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [
        f"scholarembed embed: error: INVALID_ARGUMENT: {tmp_path / 'c.jsonl'}:3: must not be empty or whitespace only"
    ]


def test_info_prints_model_info(tiny_server) -> None:
    info = json.loads(run_cli("info", "--server", tiny_server.address).stdout)
    assert info["matryoshka_dimensions"] == [64, 32, 16]


def test_sigterm_drains_in_flight_stream_and_exits_cleanly(tmp_path, tiny_model_dir) -> None:
    # The grace period is generous: the test is about what is answered, not how fast a loaded machine is.
    server = ServerProcess(
        tmp_path, "--model", str(tiny_model_dir), "--matryoshka-dims", TINY_MATRYOSHKA, "--grace-s", "120"
    )
    request = pb.EmbedRequest(texts=[" ".join(WORDS[:30])] * 32, input_type=pb.INPUT_TYPE_PASSAGE)
    signalled = threading.Event()

    def requests():
        # 20 requests, then 5 more sent only once SIGTERM has been sent: a stream still going during drain.
        for number in range(25):
            if number == 20:
                assert signalled.wait(120)
            yield pb.EmbedStreamRequest(request_id=str(number), request=request)

    with grpc.insecure_channel(server.address) as channel:
        responses = pb_grpc.EmbeddingServiceStub(channel).EmbedStream(requests())
        received = []
        for response in responses:
            received.append(response)
            if len(received) == 1:
                server.process.send_signal(signal.SIGTERM)
                signalled.set()
    # The stream was in flight when the drain began: every request, even those sent after SIGTERM, is
    # answered OK and in order, and the stream ends normally.
    assert [r.request_id for r in received] == [str(i) for i in range(25)]
    assert all(not r.HasField("error") for r in received)
    assert server.process.wait(180) == 0
    assert "stopped" in server.output()
    server.stop()


def test_client_import_never_imports_torch() -> None:
    code = "import sys, scholarembed; from scholarembed import Client, AsyncClient; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == (
        "False"
    )


def test_a_refused_call_prints_one_line_and_exits_non_zero(tiny_server) -> None:
    """The server refuses the call (this one serves no SearchService): one error line, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "scholarembed_server", "search", "protein", "--collection", "missing",
         "--server", tiny_server.address],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("scholarembed search: error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
