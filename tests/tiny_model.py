"""Tiny random EmbeddingGemma-shaped models for the tests: see scholarembed_server.random_model."""

from scholarembed_server.random_model import WORDS, build_tiny_embeddinggemma, build_tokenizer

__all__ = ["WORDS", "build_tiny_embeddinggemma", "build_tokenizer"]
