"""Regional compilation: compile the model's repeated layer once per bucket length, not the model per shape.

A transformer is one layer repeated (24 times in EmbeddingGemma-300m). Compiling that layer and
reusing the compiled code for every instance (PyTorch's "regional compilation" recipe) costs a
twenty-fourth of compiling the whole forward. Marking the batch (rows) dimension dynamic lets one
compilation serve the whole row ladder of a bucket length, so covering every static shape costs one
compilation per bucket length, whatever the token budget (Gemma3's sliding-window and full-attention
layers share it: they differ only in their masks and rotary tables, which are inputs; the engine
turns the KV cache off, whose per-layer index would otherwise give each layer its own graph).

Each length becomes ready on its own (`DeviceRunner.compile_length`), so a server can answer eagerly at
once and switch a length to its compiled layers when it is ready. A length whose compilation failed stays
eager for good. The model's layers are wrapped once, at load (`install_layer_dispatch`), in a dispatch that
runs the compiled code of the compiler active on the calling thread (`RegionalCompiler.active()`), else the
plain layer. So compilers never change the model: the same model serves the eager reference path, another
thread may compile while the model thread serves, and runners with different compile settings share it.

Compilations can be shipped: `save_artifacts` writes torch's portable cache artifacts
(`torch.compiler.save_cache_artifacts`) into a folder, `load_artifacts` hot-loads them into a fresh
process, which then compiles from the cache instead of from scratch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
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


# Dynamo keeps one cache entry of `_call_layer` per bucket length and layer kind (Gemma3 has two: sliding
# window and full attention) and compiler, and past its recompile limit (default 8) it runs eager without a
# word. The limit is read on the thread that compiles, and torch keeps config overrides per thread (2.13: a
# ContextVar), so a value set once on one thread leaves the compile thread at 8. It is raised where compiled
# layers run, in `RegionalCompiler.active()`, for that thread and only while it runs them.
MAX_BUCKET_LENGTHS = 64
_RECOMPILE_LIMITS = {"recompile_limit": 8 * MAX_BUCKET_LENGTHS, "accumulated_recompile_limit": 32 * MAX_BUCKET_LENGTHS}
_active = threading.local()  # the RegionalCompiler whose compiled layers run on this thread, if any


class _LayerDispatch(nn.Module):
    """Wraps one layer: the compiled code of the compiler active on this thread, else the layer itself."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        compiler: RegionalCompiler | None = getattr(_active, "compiler", None)
        if compiler is None:
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


def install_layer_dispatch(model: nn.Module) -> None:
    """Wrap each of the model's repeated layers (if it has them) in a `_LayerDispatch`, once, at load: the
    model is never changed again, and any number of compilers (with their own settings) can share it, each
    running its compiled layers only on the thread where it is active."""
    try:
        layers = repeated_layers(model)
    except ValueError:
        return  # nothing to compile regionally; a RegionalCompiler for it says so
    for index, layer in enumerate(layers):
        if not isinstance(layer, _LayerDispatch):
            layers[index] = _LayerDispatch(layer)


def _tensors(*values: Any) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(*value)
        elif isinstance(value, dict):
            yield from _tensors(*value.values())


class RegionalCompiler:
    """A compiled layer for a model's `_LayerDispatch` layers, and which bucket lengths it is ready (or failed)
    for. Its compiled code runs only inside `active()`, on the calling thread."""

    def __init__(
        self,
        model: nn.Module,
        lengths: Sequence[int],
        *,
        mode: str | None,
        backend: str | Callable[..., Any] = "inductor",
    ) -> None:
        if not all(isinstance(layer, _LayerDispatch) for layer in repeated_layers(model)):
            raise ValueError(f"{type(model).__name__}: its layers were not prepared (install_layer_dispatch)")
        if len(lengths) > MAX_BUCKET_LENGTHS:
            raise ValueError(f"{len(lengths)} bucket lengths: at most {MAX_BUCKET_LENGTHS} can be compiled")
        self.mode = mode
        self.compiled = torch.compile(_call_layer, mode=mode, backend=backend, dynamic=False)
        self.ready: set[int] = set()  # bucket lengths whose compiled layers are warm
        self.failed: dict[int, str] = {}  # bucket length -> why its compilation failed

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Run this compiler's layers for forwards on this thread (compiling a new length on first use)."""
        import torch._dynamo.config as dynamo_config

        previous = getattr(_active, "compiler", None)
        _active.compiler = self
        try:
            with dynamo_config.patch(**_RECOMPILE_LIMITS):
                yield
        finally:
            _active.compiler = previous

    def state(self, length: int) -> str:
        """ "ready", "failed" or "compiling" (not ready yet)."""
        if length in self.ready:
            return "ready"
        return "failed" if length in self.failed else "compiling"


def use_compile_cache(folder: str | Path) -> Path:
    """Keep inductor's and Triton's compiled kernels in `folder` (created), so a restart loads instead of
    compiling. Triton's cache lives under inductor's unless TRITON_CACHE_DIR says otherwise."""
    path = Path(folder).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return path


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
