"""The engine against the model card's own code: prompts, pooling, Dense, padding, Matryoshka, window."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import ModelCard, card_passage, card_query, cosine
from tiny_model import WORDS, build_tiny_embeddinggemma

from scholarembed_server.engine import EmbeddingEngine, matryoshka
from scholarembed_server.errors import InvalidArgumentError, ModelLoadError
from scholarembed_server.model.loading import pool
from scholarembed_server.model.prompts import EMBEDDINGGEMMA_PROMPTS, InputType
from scholarembed_server.model.runner import plan_batches
from scholarembed_server.model.tokenization import Truncation

ORACLE = 0.99999


def mixed_texts(count: int = 12, seed: int = 1) -> list[str]:
    """Very short to very long (beyond the sliding window) texts, shuffled."""
    rng = np.random.default_rng(seed)
    lengths = [1, 2, 3, 30, 5, 24, 7, 36, 1, 90, 20, 11][:count]  # 90 words: over max_tokens
    return [" ".join(rng.choice(WORDS, size=n)) for n in lengths]


@pytest.fixture(scope="module")
def card(tiny_model_dir: Path) -> ModelCard:
    return ModelCard(tiny_model_dir, max_length=128)  # sentence-transformers truncates at max_seq_length


def test_queries_match_the_model_card_one_text_at_a_time(tiny_engine, card) -> None:
    texts = mixed_texts()
    result = tiny_engine.encode(texts, InputType.QUERY)
    expected = np.stack([card.embed(card_query(t)) for t in texts])
    assert cosine(result.vectors, expected).min() >= ORACLE


def test_passages_with_and_without_titles_match_the_model_card(tiny_engine, card) -> None:
    texts = mixed_texts()
    titles = ["Cell biology", "", "Tumor growth in mice", "", *[""] * (len(texts) - 4)]
    result = tiny_engine.encode(texts, InputType.PASSAGE, titles=titles)
    expected = np.stack([card.embed(card_passage(t, title)) for t, title in zip(texts, titles, strict=True)])
    assert cosine(result.vectors, expected).min() >= ORACLE


@pytest.mark.parametrize("dimensions", [64, 32, 16])
def test_matryoshka_dimensions_match_the_model_card(tiny_engine, card, dimensions) -> None:
    texts = mixed_texts(6)
    result = tiny_engine.encode(texts, InputType.RAW, dimensions=dimensions)
    expected = np.stack([card.embed(t, dimensions) for t in texts])
    assert result.vectors.shape == (6, dimensions)
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    assert cosine(result.vectors, expected).min() >= ORACLE


def test_batching_and_padding_never_change_a_vector(tiny_engine) -> None:
    texts = mixed_texts()
    rows = [t.ids for t in tiny_engine.tokenize(texts)]
    forward = tiny_engine.runner.forward
    alone = np.stack([forward([row]) for row in rows])[:, 0]
    together = forward(rows)
    reversed_order = forward(rows[::-1])[::-1]
    assert cosine(alone, together).min() >= ORACLE
    assert cosine(alone, reversed_order).min() >= ORACLE


def test_token_budget_batches_keep_input_order(tiny_engine) -> None:
    texts = mixed_texts()
    one_batch = tiny_engine.encode(texts, InputType.QUERY, max_batch_tokens=1 << 20).vectors
    tiny_batches = tiny_engine.encode(texts, InputType.QUERY, max_batch_tokens=64).vectors
    assert cosine(one_batch, tiny_batches).min() >= ORACLE


def test_plan_batches_respects_the_padded_token_budget() -> None:
    lengths = [5, 100, 3, 50, 50, 7, 300, 1]
    batches = plan_batches(lengths, 120)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 120
    assert [6] in batches  # longer than the budget: alone


def test_mean_pooling_ignores_whatever_is_in_padded_positions() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [float("nan"), float("inf")]]])
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(pool(hidden, mask, "mean"), torch.tensor([[2.0, 3.0]]))


def test_matryoshka_truncates_then_renormalises() -> None:
    vectors = np.array([[3.0, 4.0, 12.0]], dtype=np.float32) / 13
    np.testing.assert_allclose(matryoshka(vectors, 2), [[0.6, 0.8]], rtol=1e-6)


def test_dimensions_must_be_a_matryoshka_dimension(tiny_engine) -> None:
    assert tiny_engine.check_dimensions(0) == 64
    with pytest.raises(InvalidArgumentError) as error:
        tiny_engine.check_dimensions(48)
    assert error.value.field == "dimensions"


def test_long_texts_are_truncated_and_flagged_or_rejected(tiny_engine, tiny_model_dir) -> None:
    long_text = " ".join(WORDS * 5)
    result = tiny_engine.encode([long_text, "short"], InputType.RAW)
    assert result.token_counts[0] == tiny_engine.max_tokens == 128  # from sentence_bert_config.json
    assert result.truncated == [True, False]
    ids = tiny_engine.tokenize([long_text])[0].ids
    assert ids[-1] == tiny_engine.model.tokenization.tokenizer.eos_token_id  # special tokens survive truncation
    card = ModelCard(tiny_model_dir, max_length=128)
    assert cosine(result.vectors[0], card.embed(long_text)).min() >= ORACLE
    with pytest.raises(InvalidArgumentError) as error:
        tiny_engine.encode(["short", long_text], InputType.RAW, truncation=Truncation.ERROR)
    assert error.value.field == "texts[1]"


def test_prompts_come_from_the_sentence_transformers_config(tiny_engine) -> None:
    assert tiny_engine.prompts == EMBEDDINGGEMMA_PROMPTS
    assert tiny_engine.prompts.apply(["x"], InputType.PASSAGE, ["T"]) == ["title: T | text: x"]
    assert tiny_engine.prompts.apply(["x"], InputType.PASSAGE) == ["title: none | text: x"]
    assert tiny_engine.prompts.apply(["x {y}"], InputType.QUERY) == ["task: search result | query: x {y}"]
    assert tiny_engine.prompts.apply(["x"], InputType.RAW) == ["x"]


def test_bare_gemma_folder_gets_the_model_card_prompts_and_plain_pooling(tmp_path) -> None:
    folder = build_tiny_embeddinggemma(tmp_path / "bare", st_files=False)
    engine = EmbeddingEngine.load(str(folder))
    assert engine.prompts == EMBEDDINGGEMMA_PROMPTS
    assert len(engine.model.head) == 0 and engine.model.pooling == "mean"
    assert engine.max_tokens == 512  # the model's position limit: no sentence_bert_config.json
    card = ModelCard(folder)
    texts = mixed_texts(9)
    assert (
        cosine(engine.encode(texts, InputType.QUERY).vectors, [card.embed(card_query(t)) for t in texts]).min()
        >= ORACLE
    )


def test_sliding_window_is_the_trained_one_whichever_form_the_config_stores(tmp_path) -> None:
    """The original config stores 16 (loaded as the exclusive half-width 9); an older transformers
    saved the converted 9, which newer ones would load as 5. Both must run with 9."""
    original = build_tiny_embeddinggemma(tmp_path / "original", stored_sliding_window=16, st_files=False)
    resaved = tmp_path / "resaved"
    shutil.copytree(original, resaved)
    config = json.loads((resaved / "config.json").read_text())
    config["sliding_window"] = 9
    (resaved / "config.json").write_text(json.dumps(config))

    engine = EmbeddingEngine.load(str(resaved))
    assert engine.model.encoder.config.sliding_window == 9
    assert EmbeddingEngine.load(str(original)).model.encoder.config.sliding_window == 9

    long_text = " ".join(WORDS[:60])  # far longer than the window, so the window matters
    reference = ModelCard(original).embed(long_text)
    assert cosine(engine.encode([long_text], InputType.RAW).vectors, reference).min() >= ORACLE
    naive = ModelCard(resaved)  # plain transformers on the re-saved config: the shrunken window
    assert naive.model.config.sliding_window != 9
    assert cosine(naive.embed(long_text), reference).min() < ORACLE


def test_missing_model_gives_a_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        EmbeddingEngine.load("LinerAI/embeddinggemma-300m-academic")
    with pytest.raises(ModelLoadError, match=r"not a folder|could not be loaded"):
        EmbeddingEngine.load(str(tmp_path / "no-such-folder"))


def test_weights_that_do_not_match_the_config_are_refused(tmp_path) -> None:
    """Loading is strict: transformers would otherwise start the missing layer from random values."""
    from safetensors.torch import load_file, save_file

    folder = build_tiny_embeddinggemma(tmp_path / "missing-weight")
    weights = load_file(folder / "model.safetensors")
    dropped = sorted(weights)[-1]
    del weights[dropped]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=f"missing.*{dropped}"):
        EmbeddingEngine.load(str(folder))


def test_a_dense_head_whose_weights_do_not_match_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder = build_tiny_embeddinggemma(tmp_path / "renamed-dense-weight")
    dense = folder / "2_Dense" / "model.safetensors"
    weights = {f"renamed.{key}": value for key, value in load_file(dense).items()}
    save_file(weights, dense, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="2_Dense"):
        EmbeddingEngine.load(str(folder))
