"""GPU paths: bf16 inference and exact search on the GPU. Skipped where there is no CUDA device.

The exact-search path is also checked here on the CPU (torch on CPU), so its logic is tested everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import cosine
from tiny_model import WORDS

from scholarembed_server.engine import EmbeddingEngine
from scholarembed_server.index.base import IndexKind, StoredPassage, VectorStorage
from scholarembed_server.index.embedded import EmbeddedIndex
from scholarembed_server.model.prompts import InputType


def unit_vectors(count: int, dimensions: int = 64, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dimensions)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_exact_search_matches_faiss(tmp_path, device) -> None:
    vectors = unit_vectors(500)
    passages = [StoredPassage(str(i), "", "x") for i in range(500)]
    results = {}
    for search_device in ("cpu", device):
        store = EmbeddedIndex(tmp_path / search_device, search_device=search_device)
        store.create_collection("c", dimensions=64, model="m", index_kind=IndexKind.FLAT,
                                vector_storage=VectorStorage.FLOAT32)  # fmt: skip
        store.upsert("c", passages, vectors)
        store.delete("c", ["3", "7"])
        queries = unit_vectors(8, seed=1)
        results[search_device] = store.search("c", queries, 10)
        store.close()
    if device == "cpu":
        import faiss

        kept = [i for i in range(500) if i not in (3, 7)]
        reference = faiss.IndexFlatIP(64)
        reference.add(vectors[kept])
        _, rows = reference.search(unit_vectors(8, seed=1), 10)
        assert [[str(kept[r]) for r in row] for row in rows] == [[h.id for h in q] for q in results["cpu"]]
    else:
        for expected, got in zip(results["cpu"], results[device], strict=True):
            assert [h.id for h in got][:5] == [h.id for h in expected][:5]


@pytest.mark.gpu
def test_bf16_on_cuda_matches_fp32_on_cpu(tiny_model_dir) -> None:
    cpu = EmbeddingEngine.load(str(tiny_model_dir), device="cpu")
    gpu = EmbeddingEngine.load(str(tiny_model_dir), device="cuda")
    assert gpu.dtype == torch.bfloat16
    texts = [" ".join(WORDS[i : i + 5 + 3 * i]) for i in range(10)]
    assert cosine(gpu.encode(texts, InputType.QUERY).vectors, cpu.encode(texts, InputType.QUERY).vectors).min() > 0.99
