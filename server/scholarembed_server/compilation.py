"""Regional compilation: compile the model's repeated layer once per bucket length, not the model per shape.

A transformer is one layer repeated (24 times in EmbeddingGemma-300m). Compiling that layer and
reusing the compiled code for every instance (PyTorch's "regional compilation" recipe) costs a
twenty-fourth of compiling the whole forward. Marking the batch (rows) dimension dynamic lets one
compilation serve the whole row ladder of a bucket length, so covering every static shape costs one
compilation per bucket length, whatever the token budget (Gemma3's sliding-window and full-attention
layers share it: they differ only in their masks and rotary tables, which are inputs; the engine
turns the KV cache off, whose per-layer index would otherwise give each layer its own graph).

Each length becomes ready on its own (`compile_length`), so a server can answer eagerly at once and
switch a length to its compiled layers when it is ready. A length whose compilation failed stays
eager for good. Compiled layers run only inside `active()`, on the calling thread: the same model
serves the eager reference path, and another thread may compile while the model thread serves.

Compilations can be shipped: `save_artifacts` writes torch's portable cache artifacts
(`torch.compiler.save_cache_artifacts`) into a folder, `load_artifacts` hot-loads them into a fresh
process, which then compiles from the cache instead of from scratch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ARTIFACTS_FILE = "torch-cache-artifacts.bin"
MANIFEST_FILE = "manifest.json"
MIN_DYNAMIC_ROWS = 2  # dynamo specialises a dimension of size 1: single rows run in a two-row shape


def repeated_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of identical layers: the largest ModuleList whose children share one type."""
    stacks = [
        module
        for module in model.modules()
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(child) for child in module}) == 1
    ]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no stack of repeated layers to compile")
    return max(stacks, key=lambda stack: sum(parameter.numel() for parameter in stack.parameters()))


def _call_layer(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # One function compiled for every layer: the layer is an argument (its weights are graph inputs),
    # so all instances of a layer kind share one compilation.
    return layer(*args, **kwargs)


class _RegionalLayer(nn.Module):
    """Wraps one layer: its compiled code inside `RegionalCompiler.active()` on this thread, else the layer."""

    def __init__(self, layer: nn.Module, compiler: RegionalCompiler) -> None:
        super().__init__()
        self.layer = layer
        self._compiler = [compiler]  # in a list: a Module attribute would register it as a submodule

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        compiler = self._compiler[0]
        if not compiler.is_active():
            return self.layer(hidden_states, *args, **kwargs)
        rows = hidden_states.shape[0]
        if kwargs.get("attention_mask", False) is None and hidden_states.dim() == 3:
            # transformers drops the mask of a batch without padding; an all-true mask is the same
            # attention and keeps such batches on the graph compiled for masked ones.
            length = hidden_states.shape[1]
            kwargs["attention_mask"] = torch.ones(
                (rows, 1, length, length), dtype=torch.bool, device=hidden_states.device
            )
        for tensor in _tensors(hidden_states, args, kwargs):
            if tensor.dim() > 0 and tensor.shape[0] == rows:
                torch._dynamo.mark_dynamic(tensor, 0)
        return compiler.compiled(self.layer, hidden_states, *args, **kwargs)


def _tensors(*values: Any) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(*value)
        elif isinstance(value, dict):
            yield from _tensors(*value.values())


class RegionalCompiler:
    """The compiled layer of one model, and which bucket lengths it is ready (or failed) for."""

    def __init__(self, model: nn.Module, *, mode: str | None, backend: str | Callable[..., Any] = "inductor") -> None:
        import torch._dynamo.config as dynamo_config

        self.layers = repeated_layers(model)
        self.mode = mode
        self.compiled = torch.compile(_call_layer, mode=mode, backend=backend, dynamic=False)
        self.ready: set[int] = set()  # bucket lengths whose compiled layers are warm
        self.failed: dict[int, str] = {}  # bucket length -> why its compilation failed
        self._thread_state = threading.local()
        # Every bucket length and layer kind is one cache entry of `_call_layer`: the default limit (8)
        # would send the rest to eager silently.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 1024)
        for index, layer in enumerate(self.layers):
            # A model compiled before (another compile mode) is re-wrapped: the last compiler owns it.
            inner = layer.layer if isinstance(layer, _RegionalLayer) else layer
            self.layers[index] = _RegionalLayer(inner, self)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Run the compiled layers for forwards on this thread (compiling a new length on first use)."""
        previous = getattr(self._thread_state, "active", False)
        self._thread_state.active = True
        try:
            yield
        finally:
            self._thread_state.active = previous

    def is_active(self) -> bool:
        return bool(getattr(self._thread_state, "active", False))

    def state(self, length: int) -> str:
        """ "ready", "failed" or "compiling" (not ready yet)."""
        if length in self.ready:
            return "ready"
        return "failed" if length in self.failed else "compiling"


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (all functions): what a compilation count is read from."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def fx_graph_cache_counts() -> tuple[int, int]:
    """(hits, misses) of inductor's FX graph cache in this process: hits are compilations loaded, not made."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_hit"]), int(counters["inductor"]["fxgraph_cache_miss"])


def save_artifacts(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Write this process's compilations (torch's portable cache artifacts) and a manifest into `folder`."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError("torch recorded no compile artifacts: nothing was compiled in this process")
    artifacts, info = saved
    path = Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    (path / ARTIFACTS_FILE).write_bytes(artifacts)
    manifest = manifest | {"torch": torch.__version__, "artifacts": _artifact_counts(info)}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return path / ARTIFACTS_FILE


def load_artifacts(folder: str | Path) -> dict[str, Any]:
    """Hot-load compilations written by `save_artifacts`; returns the folder's manifest.

    Artifacts from another torch version or GPU simply miss the cache: those graphs compile again.
    """
    path = Path(folder).expanduser()
    if not (path / ARTIFACTS_FILE).is_file():
        raise ValueError(f"--compile-artifacts {folder}: no {ARTIFACTS_FILE} (write one with `scholarembed compile`)")
    manifest: dict[str, Any] = json.loads((path / MANIFEST_FILE).read_text()) if (path / MANIFEST_FILE).exists() else {}
    if manifest.get("torch") not in (None, torch.__version__):
        log.warning("artifacts in %s are from torch %s, this is %s", path, manifest["torch"], torch.__version__)
    info = torch.compiler.load_cache_artifacts((path / ARTIFACTS_FILE).read_bytes())
    log.info("loaded compile artifacts from %s: %s", path, _artifact_counts(info))
    return manifest


def _artifact_counts(info: Any) -> dict[str, int]:
    artifacts = getattr(info, "artifacts", None) or {}
    return {str(kind): len(entries) for kind, entries in artifacts.items() if entries}
