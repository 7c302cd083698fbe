"""The former compile design, kept only for comparison (bench.startup, bench.throughput): the whole forward
(encoder, pooling, Dense, normalise) compiled once per static bucket shape, with CUDA graphs replayed for small
shapes on a GPU. The server compiles the repeated layer once per bucket length instead (model/compilation.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from scholarembed_server.model.buckets import LengthBuckets
from scholarembed_server.model.loading import LoadedModel
from scholarembed_server.model.runner import DeviceRunner


class WholeModelCompiled:
    """`launch(batch)` pads a batch to its bucket shape and runs the whole forward compiled for that shape."""

    def __init__(
        self,
        model: LoadedModel,
        buckets: LengthBuckets,
        *,
        compile_mode: str = "default",
        cuda_graph_max_tokens: int = 0,
        backend: str | Callable[..., Any] = "inductor",
    ) -> None:
        import torch._dynamo.config as dynamo_config

        self.buckets = buckets
        self._padding = DeviceRunner(model, buckets)  # its padding and uploads; its own forwards stay eager
        self._graphed_up_to = cuda_graph_max_tokens if model.device.type == "cuda" else 0
        # One compilation per static shape: past the recompile limit dynamo would fall back to eager silently.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * len(buckets.shapes()) + 8)
        self._compiled = torch.compile(model.embed, mode=compile_mode, dynamic=False, backend=backend)
        # CUDA graphs get a code object of their own, so their compilations do not crowd the others' cache.
        self._graphed = torch.compile(
            lambda ids, mask: model.embed(ids, mask), mode="reduce-overhead", dynamic=False, backend=backend
        )

    @torch.inference_mode()
    def launch(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        rows, length = self.buckets.shape_for(len(batch), max(len(row) for row in batch))
        input_ids, attention_mask = self._padding.padded(batch, rows, length)
        attention_mask[len(batch) :, 0] = 1  # dummy rows: one pad token each
        input_ids, attention_mask = self._padding.to_device(input_ids, attention_mask)
        if rows * length <= self._graphed_up_to:
            torch.compiler.cudagraph_mark_step_begin()  # the previous replay's output has been copied out
            vectors = self._graphed(input_ids, attention_mask)
        else:
            vectors = self._compiled(input_ids, attention_mask)
        return vectors[: len(batch)].float().cpu().numpy()
