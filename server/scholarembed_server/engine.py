"""The embedding engine: the one place that turns texts into vectors, assembled from its parts in model/.

    model/loading.py       an immutable LoadedModel: weights, tokenizer, prompts, pooling, Dense, dimensions
    model/tokenization.py  prompted texts -> token ids within the limit, from any thread
    model/runner.py        token rows -> vectors on one device: padding, buckets, streams, compilation

Every door (the batcher behind gRPC and HTTP, the Triton model, the CLI's in-process mode, Ray, the benchmark)
goes through `EmbeddingEngine`: prompt -> tokenize -> forward -> pool -> (Dense) -> normalise -> Matryoshka
truncate -> re-normalise. There is no second copy of any of these steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import DEFAULT_MODEL
from .errors import InvalidArgumentError
from .model.buckets import LengthBuckets
from .model.loading import LoadedModel, load_model
from .model.prompts import InputType, PromptTemplates
from .model.runner import DeviceRunner
from .model.tokenization import TokenizedText, Truncation


@dataclass
class EncodeResult:
    vectors: np.ndarray  # (n, dimensions) float32, unit L2 norm
    token_counts: list[int]
    truncated: list[bool]


def matryoshka(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """Keep the first `dimensions` components and re-normalise to unit length."""
    if dimensions == vectors.shape[1]:
        return vectors
    head = vectors[:, :dimensions]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    return (head / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class EmbeddingEngine:
    """A loaded model and the runner that embeds with it on its device.

    `encode` is the whole pipeline for a list of texts and is what simple doors call; the batcher drives the
    runner itself, and the shared request path (embedder.py) tokenizes and validates with the model's parts.
    """

    model: LoadedModel
    runner: DeviceRunner

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_tokens: int | None = None,
        revision: str | None = None,
        matryoshka_dims: Sequence[int] | None = None,
        prompts: PromptTemplates | None = None,
        served_model_name: str | None = None,
    ) -> EmbeddingEngine:
        """Load a model (hub id or folder) with an eager runner; `with_buckets` gives a bucketed one."""
        loaded = load_model(
            model,
            device=device,
            dtype=dtype,
            max_tokens=max_tokens,
            revision=revision,
            matryoshka_dims=matryoshka_dims,
            prompts=prompts,
            served_model_name=served_model_name,
        )
        return cls(loaded, DeviceRunner(loaded))

    def with_buckets(
        self,
        buckets: LengthBuckets,
        *,
        compile_mode: str | None = None,
        compile_backend: str | Callable[..., Any] = "inductor",
    ) -> EmbeddingEngine:
        """The same model with a runner of its own that pads every batch to a static bucket shape, and compiles
        the repeated layer per bucket length with torch.compile(mode=compile_mode) unless that is None."""
        return EmbeddingEngine(
            self.model, DeviceRunner(self.model, buckets, compile_mode=compile_mode, compile_backend=compile_backend)
        )

    # What every door reads about the model.
    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def dimensions(self) -> int:
        return self.model.dimensions

    @property
    def matryoshka_dims(self) -> tuple[int, ...]:
        return self.model.matryoshka_dims

    @property
    def max_tokens(self) -> int:
        return self.model.max_tokens

    @property
    def prompts(self) -> PromptTemplates:
        return self.model.prompts

    def tokenize(self, texts: Sequence[str], truncation: Truncation = Truncation.END) -> list[TokenizedText]:
        """Token ids per (already prompted) text; thread-safe (see model.tokenization)."""
        return self.model.tokenization.tokenize(texts, truncation)

    def check_dimensions(self, dimensions: int) -> int:
        """Map 0 to the full size; reject anything that is not a Matryoshka dimension."""
        if dimensions == 0:
            return self.dimensions
        if dimensions not in self.matryoshka_dims:
            raise InvalidArgumentError(
                "dimensions", f"{dimensions} is not one of {list(self.matryoshka_dims)} (or 0 for full size)"
            )
        return dimensions

    def encode(
        self,
        texts: Sequence[str],
        input_type: InputType,
        *,
        titles: Sequence[str] | None = None,
        dimensions: int = 0,
        truncation: Truncation = Truncation.END,
        max_batch_tokens: int = 16384,
    ) -> EncodeResult:
        """Prompt, tokenize and embed texts in length-sorted token-budget batches; one vector per text, in order."""
        dimensions = self.check_dimensions(dimensions)
        tokenized = self.tokenize(self.prompts.apply(texts, input_type, titles), truncation)
        vectors = self.runner.forward_planned([t.ids for t in tokenized], max_batch_tokens)
        return EncodeResult(
            vectors=matryoshka(vectors, dimensions),
            token_counts=[len(t.ids) for t in tokenized],
            truncated=[t.truncated for t in tokenized],
        )
