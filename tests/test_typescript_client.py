"""The TypeScript example (examples/typescript) on a real server: the Python client's vectors, acks and hits."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MATRYOSHKA, ServerProcess
from reference import cosine
from tiny_model import WORDS

import scholarembed
from scholarembed import Client

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "typescript"
QUERIES = ["protein gene expression", "tumor cell immune response", "drug dose"]
DIMENSIONS = 32

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="needs Node.js and npm"
)


@pytest.fixture(scope="module")
def example() -> Path:
    """examples/typescript installed from its lock file (once; node_modules is kept), lint-checked and compiled."""
    installed = EXAMPLE / "node_modules" / ".package-lock.json"
    lock = EXAMPLE / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, check=True, timeout=300)
    for script in ("lint", "build"):  # prettier, then tsc (strict type checking)
        subprocess.run(["npm", "run", "--silent", script], cwd=EXAMPLE, check=True, timeout=120)
    return EXAMPLE / "dist" / "main.js"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("typescript")
    server = ServerProcess(
        folder, "--model", str(tiny_model_dir), "--matryoshka-dims", TINY_MATRYOSHKA, "--data-dir", str(folder / "data")
    )
    yield server
    server.stop()


def write_corpus(path: Path, count: int, duplicate_at: int | None = None) -> list[dict]:
    rng = np.random.default_rng(7)
    records = [
        {
            "_id" if i % 3 == 0 else "id": f"p{i}",  # BEIR's _id works too
            "title": " ".join(rng.choice(WORDS, size=2)) if i % 2 else "",
            "text": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 40)))),
            "metadata": {"year": 2000 + i % 4},
        }
        for i in range(count)
    ]
    if duplicate_at is not None:  # a valid text under an id its batch already has: refused in-band
        records.insert(duplicate_at, {"id": "p1", "text": "a second p1 in the same request"})
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return records


def run_example(example: Path, server: ServerProcess, corpus: Path, collection: str, out: Path):
    command = ["node", str(example), server.address, "--corpus", str(corpus), "--collection", collection,
               "--dimensions", str(DIMENSIONS), "--batch-size", "8", "--window", "3", "--top-k", "5",
               "--out", str(out)]  # fmt: skip
    for query in QUERIES:
        command += ["--query", query]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)  # a hang guard, not a speed claim
    return run, json.loads(out.read_text()) if out.exists() else None


def test_typescript_client_matches_the_python_client(example, server, tmp_path) -> None:
    records = write_corpus(tmp_path / "corpus.jsonl", 42)
    run, result = run_example(example, server, tmp_path / "corpus.jsonl", "typescript", tmp_path / "out.json")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "upserted 42 passages" in run.stdout

    assert result["model"]["matryoshka_dimensions"] == [64, 32, 16]
    assert result["dimensions"] == DIMENSIONS
    with Client(server.address) as client:
        queries = client.embed_queries(QUERIES, dimensions=DIMENSIONS)
        passages = client.embed_passages(
            [r["text"] for r in records], titles=[r["title"] for r in records], dimensions=DIMENSIONS
        )
        for python, typescript in ((queries, result["queries"]["vectors"]), (passages, result["passages"]["vectors"])):
            decoded = np.asarray(typescript, dtype=np.float32)
            assert decoded.shape == python.shape
            assert cosine(decoded, python).min() >= 0.99999
            np.testing.assert_allclose(decoded, python, atol=1e-6)

        acks = result["upserts"]
        assert [a["requestId"] for a in acks] == [f"typescript-{n}" for n in range(6)]
        assert [a["upserted"] for a in acks] == [8, 8, 8, 8, 8, 2]
        assert all(a["error"] is None for a in acks)
        assert [i for a in acks for i in a["ids"]] == [f"p{i}" for i in range(42)]
        assert client.get_collection("typescript").passage_count == 42

        expected = client.search_many(QUERIES, collection="typescript", top_k=5, dimensions=DIMENSIONS)
        for hits, want in zip(result["search"], expected, strict=True):
            assert [h["id"] for h in hits] == [h.id for h in want]
            np.testing.assert_allclose([h["score"] for h in hits], [h.score for h in want], atol=1e-6)


def test_typescript_client_reports_a_refused_request_and_goes_on(example, server, tmp_path) -> None:
    write_corpus(tmp_path / "corpus.jsonl", 20, duplicate_at=5)
    run, result = run_example(example, server, tmp_path / "corpus.jsonl", "refused", tmp_path / "out.json")
    assert run.returncode == 1, run.stdout + run.stderr  # some of the corpus was refused
    first, *rest = result["upserts"]
    assert first["error"]["code"] == "INVALID_ARGUMENT"
    assert first["error"]["message"].startswith("passages[5].id: duplicate id 'p1'")
    assert first["upserted"] == 0
    assert [(a["upserted"], a["error"]) for a in rest] == [(8, None), (5, None)]
    with Client(server.address) as client:
        stored = {p.id for p in client.get_passages("refused", [f"p{i}" for i in range(20)])}
        assert stored == {f"p{i}" for i in range(7, 20)}  # the refused request stored nothing
        assert {h["id"] for q in result["search"] for h in q} <= stored


def test_typescript_client_searches_hybrid_with_filters(example, server, tmp_path) -> None:
    """--mode hybrid --min-year 2002: the same fused hits, ranks and filter as the Python client."""
    write_corpus(tmp_path / "corpus.jsonl", 30)
    out = tmp_path / "out.json"
    corpus = str(tmp_path / "corpus.jsonl")
    command = ["node", str(example), server.address, "--corpus", corpus, "--collection", "typescript-hybrid",
               "--mode", "hybrid", "--min-year", "2002", "--top-k", "5", "--out", str(out)]  # fmt: skip
    for query in QUERIES:
        command += ["--query", query]
    run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    with Client(server.address) as client:
        expected = client.search_many(
            QUERIES, collection="typescript-hybrid", top_k=5, mode="hybrid",
            conditions=[scholarembed.filters.at_least("year", 2002)], include_passages=True,
        )  # fmt: skip
    for hits, want in zip(result["search"], expected, strict=True):
        assert [h["id"] for h in hits] == [h.id for h in want]
        assert all(int(h.metadata["year"]) >= 2002 for h in want)
        for hit, python in zip(hits, want, strict=True):
            np.testing.assert_allclose(hit["score"], python.score, rtol=1e-6)
            for name in ("dense", "lexical"):
                place = getattr(python, name)
                assert (hit[name] and hit[name]["rank"]) == (place and place.rank)
