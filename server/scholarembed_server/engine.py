"""The embedding engine: the one place that turns texts into vectors.

Every door (the gRPC batcher, the Triton model, the CLI's in-process mode, the benchmark) goes
through `EmbeddingEngine`: prompt -> tokenize -> forward -> pool -> (Dense) -> normalise ->
Matryoshka truncate -> re-normalise. There is no second copy of any of these steps.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .buckets import LengthBuckets
from .compilation import MIN_DYNAMIC_ROWS, RegionalCompiler, fx_graph_cache_counts, graphs_compiled
from .config import DEFAULT_MODEL
from .errors import InvalidArgumentError, ModelLoadError

log = logging.getLogger(__name__)

EMBEDDINGGEMMA_MATRYOSHKA_DIMS = (768, 512, 256, 128)


class InputType(enum.Enum):
    QUERY = "query"
    PASSAGE = "passage"
    RAW = "raw"


class Truncation(enum.Enum):
    END = "end"  # keep the first max_tokens tokens and flag the text
    ERROR = "error"  # reject the text


@dataclass(frozen=True)
class PromptTemplates:
    """str.format templates per input type; RAW text is never templated."""

    query: str = "{text}"
    passage: str = "{title} {text}"
    passage_untitled: str = "{text}"

    def apply(self, texts: Sequence[str], input_type: InputType, titles: Sequence[str] | None = None) -> list[str]:
        if input_type is InputType.RAW:
            return list(texts)
        if input_type is InputType.QUERY:
            return [self.query.format(text=text) for text in texts]
        titles = titles or [""] * len(texts)
        return [
            self.passage.format(title=title, text=text) if title else self.passage_untitled.format(text=text)
            for title, text in zip(titles, texts, strict=True)
        ]


# The model card's formats for EmbeddingGemma and its fine-tunes (retrieval task).
EMBEDDINGGEMMA_PROMPTS = PromptTemplates(
    query="task: search result | query: {text}",
    passage="title: {title} | text: {text}",
    passage_untitled="title: none | text: {text}",
)


@dataclass(frozen=True)
class TokenizedText:
    ids: list[int]
    truncated: bool


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


def plan_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Group indices into batches whose padded size (rows x longest row) fits the token budget.

    Indices are sorted by length, longest first, so each batch holds similar lengths and padding
    stays small. A single row longer than the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Sorted descending, so the first row of a batch is its longest.
        longest = lengths[current[0]] if current else lengths[index]
        if current and (len(current) + 1) * longest > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


class PendingVectors:
    """The vectors of a launched batch. On CUDA they are still being computed and copied to pinned host
    memory when `launch` returns; `wait()` blocks until they are there. Elsewhere they are ready."""

    def __init__(self, host: torch.Tensor, rows: int, done: Any = None, eager_reason: str | None = None) -> None:
        self._host = host  # (padded rows, dims) float32 on the host
        self._rows = rows  # real rows: dummy rows beyond them are dropped
        self._done = done  # a torch.cuda.Event recorded after the copy, or None
        # Why a compiled engine ran this batch eagerly: "compiling" (its length is not ready yet) or "failed".
        self.eager_reason = eager_reason

    @classmethod
    def of(cls, vectors: np.ndarray) -> PendingVectors:
        """Vectors already computed."""
        return cls(torch.from_numpy(vectors), len(vectors))

    @property
    def ready(self) -> bool:
        return self._done is None or bool(self._done.query())

    def wait(self) -> np.ndarray:
        """(rows, full dims) float32 unit vectors, one per real row, in order."""
        if self._done is not None:
            self._done.synchronize()
        # A copy, so the pinned block goes back to its pool instead of living on in the results.
        return self._host[: self._rows].numpy().copy()


def use_compile_cache(folder: str | Path) -> Path:
    """Keep inductor's and Triton's compiled kernels in `folder` (created), so a restart loads instead of
    compiling. Triton's cache lives under inductor's unless TRITON_CACHE_DIR says otherwise."""
    path = Path(folder).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return path


class _Dense(nn.Module):
    """A sentence-transformers Dense module (linear + activation), applied after pooling."""

    _ACTIVATIONS: ClassVar[dict[str, type[nn.Module]]] = {
        "torch.nn.modules.linear.Identity": nn.Identity,
        "torch.nn.modules.activation.Tanh": nn.Tanh,
        "torch.nn.modules.activation.ReLU": nn.ReLU,
        "torch.nn.modules.activation.GELU": nn.GELU,
    }

    def __init__(self, folder: Path) -> None:
        super().__init__()
        config = json.loads((folder / "config.json").read_text())
        activation_name = config.get("activation_function", "torch.nn.modules.linear.Identity")
        if activation_name not in self._ACTIVATIONS:
            raise ModelLoadError(f"{folder}: unsupported Dense activation {activation_name!r}")
        self.linear = nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
        self.activation = self._ACTIVATIONS[activation_name]()
        self.load_state_dict(_load_state_dict(folder), strict=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(features))


def _load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ModelLoadError(f"{folder}: no model.safetensors or pytorch_model.bin")


def _read_json(path: Path) -> dict[str, Any] | list[Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def resolve_model_folder(model: str, revision: str | None = None) -> tuple[Path, str]:
    """Return (local folder, human-readable source). A hub id is fetched into, or read from, the HF cache.

    HF_HUB_OFFLINE=1 is respected by huggingface_hub: then only the cache is consulted.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve(), str(path.resolve())
    if path.exists() or model.startswith((".", "/", "~")):
        raise ModelLoadError(f"model {model!r}: not a folder")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(model, revision=revision))
    except Exception as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else "it is neither a local folder nor downloadable from the hub"
        )
        reason = f"{type(error).__name__}: {error}"
        raise ModelLoadError(f"model {model!r} could not be loaded: {hint} ({reason})") from error
    # Snapshot folders are named after the commit, so the source pins the exact revision.
    return folder, f"{model}@{folder.name}"


def fix_bidirectional_sliding_window(config: Any, raw_config: dict[str, Any]) -> None:
    """Make the effective sliding window the one the model was trained with.

    Gemma3 configs with use_bidirectional_attention store a window W (e.g. 512) that transformers
    converts at load time to the exclusive half-width W // 2 + 1 (257). Checkpoints saved by
    transformers releases whose to_dict did not undo that conversion store the converted value
    (257), which newer releases convert once more (to 129), silently shrinking the window.
    A stored odd value is such an already-converted width (converting an even window always
    gives an odd one), so it is used as is.
    """
    if not raw_config.get("use_bidirectional_attention") or raw_config.get("sliding_window") is None:
        return
    stored = int(raw_config["sliding_window"])
    effective = stored if stored % 2 == 1 else stored // 2 + 1
    if getattr(config, "sliding_window", None) != effective:
        log.warning("sliding_window: config says %d, loaded as %s; using %d", stored, config.sliding_window, effective)
        config.sliding_window = effective


_REGIONAL_LOCK = threading.Lock()  # guards the creation of an engine's RegionalCompiler (see `regional`)


@dataclass
class EmbeddingEngine:
    """A loaded model with its tokenizer, prompts and pooling head.

    `forward` is the one synchronous call that turns a ready batch of token ids into unit vectors;
    `encode` is the whole pipeline for a list of texts and is what simple doors call.
    """

    model: nn.Module
    tokenizer: Any
    model_id: str
    source: str
    device: torch.device
    dtype: torch.dtype
    max_tokens: int
    prompts: PromptTemplates
    matryoshka_dims: tuple[int, ...]
    dense: nn.Sequential = field(default_factory=nn.Sequential)
    pooling: str = "mean"
    # Static bucket shapes (see `with_buckets`); None runs every batch eagerly at its own shape.
    buckets: LengthBuckets | None = None
    compile_mode: str | None = None  # torch.compile mode for the bucket shapes; None: eager
    # "layers": the repeated layer, compiled once per bucket length (dynamic rows); "whole": the whole
    # forward, compiled once per static shape (the former design, kept for comparison and CUDA graphs).
    compile_scope: str = "layers"
    compile_backend: str | Callable[..., Any] = "inductor"  # torch.compile backend (tests count graphs with "eager")
    cuda_graph_max_tokens: int = 0  # shapes up to this many padded tokens replay CUDA graphs (CUDA only)
    compile_seconds: float = field(default=0.0, init=False)
    # Compiled functions: per CUDA-graph use (True/False) under scope "whole", "regional" under "layers".
    _compiled: dict[Any, Any] = field(default_factory=dict, init=False, repr=False)
    _copy_stream: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Made here, not on first use: the model thread and the compile thread both upload, and each would
        # have made one (a copy by `with_buckets` gets its own).
        if self.device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(self.device)

    @property
    def dimensions(self) -> int:
        return self.matryoshka_dims[0]

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
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        folder, source = resolve_model_folder(model, revision)
        torch_device = torch.device(_resolve_device(device))
        torch_dtype = _resolve_dtype(dtype, torch_device)
        raw_config = _read_json(folder / "config.json")
        if not isinstance(raw_config, dict):
            raise ModelLoadError(
                f"model {model!r}: {folder} has no config.json; pass the folder a model was saved to "
                "(save_pretrained, or a hub download: config.json, tokenizer and weights), or a hub id"
            )
        try:
            config = AutoConfig.from_pretrained(folder)
            fix_bidirectional_sliding_window(config, raw_config)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            # Settle the shared tokenizer's state (no truncation, no padding: a tokenizer.json may enable
            # either) now, before threads share it; `tokenize` never changes it again.
            tokenizer(["."], truncation=False, return_attention_mask=False)
            hf_model = AutoModel.from_pretrained(folder, config=config, dtype=torch_dtype, attn_implementation="sdpa")
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"model {model!r} could not be loaded from {folder}: {error}") from error
        hf_model.to(torch_device).eval()
        # An encoder needs no KV cache; one would also give each layer its own compilation (its index is read).
        if hasattr(hf_model.config, "use_cache"):
            hf_model.config.use_cache = False

        modules = _read_json(folder / "modules.json") or []
        pooling = "mean"
        dense_layers: list[nn.Module] = []
        for module in modules:
            module_type = module.get("type", "")
            module_folder = folder / module.get("path", "")
            if module_type.endswith(".Pooling"):
                pooling = _pooling_mode(module_folder)
            elif module_type.endswith(".Dense"):
                dense_layers.append(_Dense(module_folder))
        dense = nn.Sequential(*dense_layers).to(torch_device).eval()  # kept in fp32: it is tiny

        hidden_size = int(hf_model.config.hidden_size)
        full_dims = dense_layers[-1].linear.out_features if dense_layers else hidden_size
        family_is_embeddinggemma = raw_config.get("model_type") == "gemma3_text" and bool(
            raw_config.get("use_bidirectional_attention")
        )
        if matryoshka_dims:
            dims = tuple(sorted({int(d) for d in matryoshka_dims} | {full_dims}, reverse=True))
            if dims[0] != full_dims:
                raise ModelLoadError(f"matryoshka dimensions {dims} exceed the model's {full_dims}")
        elif family_is_embeddinggemma and full_dims == EMBEDDINGGEMMA_MATRYOSHKA_DIMS[0]:
            dims = EMBEDDINGGEMMA_MATRYOSHKA_DIMS
        else:
            dims = (full_dims,)

        if prompts is None:
            prompts = _prompts_from_folder(folder) or (
                EMBEDDINGGEMMA_PROMPTS if family_is_embeddinggemma else PromptTemplates()
            )
        limit = _model_max_tokens(folder, hf_model.config, tokenizer)
        if max_tokens:
            position_limit = getattr(hf_model.config, "max_position_embeddings", None) or max_tokens
            limit = min(max_tokens, int(position_limit))
        # The id clients see and collections record: the operator's name for it (--served-model-name, as in
        # vLLM and TEI), else the hub id, else the folder's path. Never config.json's _name_or_path: it names
        # the checkpoint a model was trained from (all-MiniLM-L6-v2's says nreimers/MiniLM-L6-H384-uncased),
        # so a fine-tune would pass for its base, and share its collections.
        model_id = served_model_name or (source if Path(model).expanduser().is_dir() else model)
        engine = cls(
            model=hf_model,
            tokenizer=tokenizer,
            model_id=model_id,
            source=source,
            device=torch_device,
            dtype=torch_dtype,
            max_tokens=limit,
            prompts=prompts,
            matryoshka_dims=dims,
            dense=dense,
            pooling=pooling,
        )
        log.info(
            "loaded %s from %s on %s (%s): %d dims, max %d tokens",
            model_id,
            source,
            torch_device,
            torch_dtype,
            dims[0],
            limit,
        )
        return engine

    def tokenize(self, texts: Sequence[str], truncation: Truncation = Truncation.END) -> list[TokenizedText]:
        """Token ids per (already prompted) text, special tokens included, cut to max_tokens.

        Under Truncation.ERROR a text over the limit raises InvalidArgumentError naming texts[i].
        """
        encoded = self.tokenizer(
            list(texts), add_special_tokens=True, truncation=False, return_attention_mask=False, verbose=False
        )["input_ids"]
        result = []
        for index, ids in enumerate(encoded):
            if len(ids) <= self.max_tokens:
                result.append(TokenizedText(ids, truncated=False))
                continue
            if truncation is Truncation.ERROR:
                raise InvalidArgumentError(
                    f"texts[{index}]",
                    f"{len(ids)} tokens (prompt included) exceed the model's limit of {self.max_tokens}",
                )
            result.append(TokenizedText(self._cut(texts[index]), truncated=True))
        return result

    def _cut(self, text: str) -> list[int]:
        """A text's ids cut to max_tokens as the tokenizer's own truncation cuts them: the text's tokens
        first, then the special tokens (e.g. EOS) around them, so they survive.

        Several threads tokenize at once, and a fast tokenizer's truncation is a setting on the shared
        object that each `truncation=True` call would set (and the next `truncation=False` call clear):
        one thread's call could have another's text come back uncut. So the cut is done here on the
        encoding, and the tokenizer's settings are never touched after `load`.
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a Python tokenizer: its truncation is per call, not shared state
            ids: list[int] = self.tokenizer(
                text, add_special_tokens=True, truncation=True, max_length=self.max_tokens, return_attention_mask=False
            )["input_ids"]
            return ids
        encoding = backend.encode(text, add_special_tokens=False)
        encoding.truncate(self.max_tokens - backend.num_special_tokens_to_add(is_pair=False))
        return list(backend.post_process(encoding, add_special_tokens=True).ids)

    @torch.inference_mode()
    def forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Embed a ready batch of token-id rows: (n, full dims) float32 unit vectors, one per row, in order.

        The eager reference: the batch runs at its own shape. Rows are right-padded; padding never
        changes a vector because pooling ignores masked positions and every position's attention is
        masked to real tokens.
        """
        input_ids, attention_mask = self._padded(batch, len(batch), max(len(row) for row in batch))
        input_ids = input_ids.to(self.device, non_blocking=True)
        attention_mask = attention_mask.to(self.device, non_blocking=True)
        return self._embed(input_ids, attention_mask).cpu().numpy()

    def with_buckets(
        self,
        buckets: LengthBuckets,
        *,
        compile_mode: str | None = None,
        cuda_graph_max_tokens: int = 0,
        compile_scope: str = "layers",
        compile_backend: str | Callable[..., Any] = "inductor",
    ) -> EmbeddingEngine:
        """A copy sharing this model and tokenizer that runs every batch in a static bucket shape,
        compiled with torch.compile(mode=compile_mode) unless that is None: per bucket length, its
        repeated layer (compile_scope "layers"), or per shape, the whole forward ("whole"). `warmup`
        compiles them all; a copy with the same compile settings shares this engine's compilations."""
        if compile_scope not in ("layers", "whole"):
            raise ValueError(f"compile scope {compile_scope!r}: use layers or whole")
        settings = (compile_mode, cuda_graph_max_tokens, compile_scope, compile_backend)
        copy = dataclasses.replace(
            self,
            buckets=buckets,
            compile_mode=compile_mode,
            cuda_graph_max_tokens=cuda_graph_max_tokens,
            compile_scope=compile_scope,
            compile_backend=compile_backend,
        )
        if settings == (self.compile_mode, self.cuda_graph_max_tokens, self.compile_scope, self.compile_backend):
            copy._compiled = self._compiled
        return copy

    @property
    def compiles_layers(self) -> bool:
        return self.buckets is not None and self.compile_mode is not None and self.compile_scope == "layers"

    @property
    def regional(self) -> RegionalCompiler:
        """The compiled layer and its per-length readiness (compile_scope "layers"), shared by copies."""
        # Locked: the compile thread and the model thread may both ask first; a second compiler would
        # re-wrap the layers, and the length the first was compiling would stay eager for good.
        with _REGIONAL_LOCK:
            if "regional" not in self._compiled:
                self._compiled["regional"] = RegionalCompiler(
                    self.model, mode=self.compile_mode, backend=self.compile_backend
                )
            compiler = self._compiled["regional"]
        assert isinstance(compiler, RegionalCompiler)
        return compiler

    def plan(self, lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
        """Row indices grouped into batches: by bucket (with the buckets' own budget) when buckets are on,
        else by `plan_batches`. Every index appears exactly once."""
        if self.buckets is not None:
            return self.buckets.plan(lengths)
        return plan_batches(lengths, max_batch_tokens)

    @torch.inference_mode()
    def launch(self, batch: Sequence[Sequence[int]]) -> PendingVectors:
        """Start embedding a batch; `.wait()` on the result gives what `forward(batch)` gives.

        With buckets, the batch is padded to its bucket shape (dummy rows hold one pad token and are
        dropped). On CUDA this returns once the work is queued: inputs go up from pinned memory on a
        side stream, the vectors come back to pinned memory asynchronously, so the caller can prepare
        the next batch while the GPU runs this one.
        """
        longest = max(len(row) for row in batch)
        if self.buckets is None or longest > self.buckets.lengths[-1]:
            return PendingVectors.of(self.forward(batch))
        rows, length = self.buckets.shape_for(len(batch), longest)
        if self.compiles_layers:
            state = self.regional.state(length)
            if state != "ready":  # never worse than eager: the batch runs at its own shape meanwhile
                pending = PendingVectors.of(self.forward(batch))
                pending.eager_reason = state
                return pending
            rows = max(rows, MIN_DYNAMIC_ROWS)
        pinned = self.device.type == "cuda"
        input_ids, attention_mask = self._padded(batch, rows, length, pin_memory=pinned)
        attention_mask[len(batch) :, 0] = 1  # dummy rows: one pad token each, so no row is fully masked
        input_ids, attention_mask = self._to_device(input_ids, attention_mask)
        if self.compiles_layers:
            with self.regional.active():
                vectors = self._embed(input_ids, attention_mask)
        else:
            vectors = self._bucket_function(rows * length)(input_ids, attention_mask)
        if not pinned:
            return PendingVectors(vectors.cpu(), len(batch))
        host = torch.empty(vectors.shape, dtype=vectors.dtype, pin_memory=True)
        host.copy_(vectors, non_blocking=True)
        done = torch.cuda.Event()
        # On the engine's device's stream, not the thread's current device's (0 unless set): on cuda:1 an
        # event recorded on cuda:0 would report the copy done before it had run.
        done.record(torch.cuda.current_stream(self.device))
        return PendingVectors(host, len(batch), done)

    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Padded ids and mask on the device -> unit vectors on the device: the one forward, pool, Dense
        and normalise, for the eager and the compiled path alike."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = self._pool(hidden.float(), attention_mask.bool())
        pooled = self.dense(pooled)
        return F.normalize(pooled, p=2, dim=-1)

    def _embed_graphed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # The same computation under its own code object, so its CUDA-graph compilations keep a dynamo
        # cache of their own instead of sharing (and crowding) `_embed`'s.
        return self._embed(input_ids, attention_mask)

    def _bucket_function(self, padded_tokens: int) -> Callable[..., torch.Tensor]:
        """`_embed`, compiled for static shapes when compile_mode is set; small shapes on CUDA replay
        CUDA graphs (launch overhead dominates them)."""
        if self.compile_mode is None:
            return self._embed
        graphed = self.device.type == "cuda" and padded_tokens <= self.cuda_graph_max_tokens
        if graphed not in self._compiled:
            import torch._dynamo.config as dynamo_config

            # One compilation per static shape; the default limit (8) would fall back to eager silently.
            shapes = len(self.buckets.shapes()) if self.buckets else 0
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * shapes + 8)
            dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * shapes + 64)
            function = self._embed_graphed if graphed else self._embed
            mode = "reduce-overhead" if graphed else self.compile_mode
            self._compiled[graphed] = torch.compile(function, mode=mode, dynamic=False, backend=self.compile_backend)
        compiled = self._compiled[graphed]
        if not graphed:
            return compiled

        def replay(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            # Each call is a new step: the previous replay's output has already been copied out.
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(input_ids, attention_mask)

        return replay

    def _padded(
        self, batch: Sequence[Sequence[int]], rows: int, length: int, *, pin_memory: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, length) ids and mask on the host, right-padded; rows beyond the batch are all padding."""
        input_ids = torch.full((rows, length), self._pad_id, dtype=torch.long, pin_memory=pin_memory)
        attention_mask = torch.zeros((rows, length), dtype=torch.long, pin_memory=pin_memory)
        for row_index, row in enumerate(batch):
            input_ids[row_index, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            attention_mask[row_index, : len(row)] = 1
        return input_ids, attention_mask

    def _to_device(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Host -> device; on CUDA from pinned memory on a side stream that the compute stream waits for."""
        if self.device.type != "cuda":
            return tuple(tensor.to(self.device) for tensor in tensors)
        compute = torch.cuda.current_stream(self.device)
        self._copy_stream.wait_stream(compute)  # the copy may reuse memory the compute stream just freed
        with torch.cuda.stream(self._copy_stream):
            moved = tuple(tensor.to(self.device, non_blocking=True) for tensor in tensors)
        compute.wait_stream(self._copy_stream)
        for tensor in moved:
            tensor.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        return moved

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        # torch.where, not hidden * mask: a NaN or inf in a padded position must not leak into the sum.
        summed = torch.where(mask.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
        counts = mask.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)
        return summed.sum(dim=1) / counts

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
        vectors = self.forward_planned([t.ids for t in tokenized], max_batch_tokens)
        return EncodeResult(
            vectors=matryoshka(vectors, dimensions),
            token_counts=[len(t.ids) for t in tokenized],
            truncated=[t.truncated for t in tokenized],
        )

    def forward_planned(self, rows: Sequence[Sequence[int]], max_batch_tokens: int = 16384) -> np.ndarray:
        """Embed any number of token-id rows in length-sorted token-budget batches (see `plan`):
        (n, full dims) float32 unit vectors, one per row, in order."""
        vectors = np.empty((len(rows), self.dimensions), dtype=np.float32)
        in_flight: deque[tuple[list[int], PendingVectors]] = deque()
        for batch in self.plan([len(row) for row in rows], max_batch_tokens):
            in_flight.append((batch, self.launch([rows[i] for i in batch])))
            if len(in_flight) > 1:  # one batch queued behind the running one keeps the GPU busy
                done, pending = in_flight.popleft()
                vectors[done] = pending.wait()
        for done, pending in in_flight:
            vectors[done] = pending.wait()
        return vectors

    def check_dimensions(self, dimensions: int) -> int:
        """Map 0 to the full size; reject anything that is not a Matryoshka dimension."""
        if dimensions == 0:
            return self.dimensions
        if dimensions not in self.matryoshka_dims:
            raise InvalidArgumentError(
                "dimensions", f"{dimensions} is not one of {list(self.matryoshka_dims)} (or 0 for full size)"
            )
        return dimensions

    def warmup(self, *, compile: bool = True) -> None:
        """Run the shortest and the longest input once, so the first request pays no allocation cost.

        With buckets, run every bucket shape once: this is when they are compiled (or loaded from the
        compile cache), so no request ever waits for a compilation. `compile_seconds` says how long it took.
        With compile_scope "layers" and compile=False only the eager path is warmed: `compile_buckets`
        (e.g. in another thread) compiles the lengths later, while batches of the rest run eager.
        """
        short = self.tokenize(["warmup"])[0].ids
        self.forward([short])
        self.forward([(short * self.max_tokens)[: self.max_tokens]])
        if self.buckets is None:
            return
        if self.compiles_layers:
            if compile:
                self.compile_buckets()
            return
        started = time.perf_counter()
        for rows, length in self.buckets.shapes():
            shape_started = time.perf_counter()
            self.launch([(short * length)[:length]] * rows).wait()
            log.debug("bucket %d x %d ready in %.1fs", rows, length, time.perf_counter() - shape_started)
        self.compile_seconds = time.perf_counter() - started
        log.info(
            "%d bucket shapes ready in %.1fs (%s)",
            len(self.buckets.shapes()),
            self.compile_seconds,
            f"torch.compile mode {self.compile_mode}" if self.compile_mode else "eager",
        )

    def compile_buckets(
        self, stop: threading.Event | None = None, on_length: Callable[[int, str], None] | None = None
    ) -> None:
        """Compile the repeated layer for every bucket length not compiled yet, shortest first (compile_scope
        "layers"). A length whose compilation fails is logged and stays eager; `on_length(length, state)`
        follows each length; `stop` ends the loop between lengths."""
        assert self.buckets is not None and self.compiles_layers
        started = time.perf_counter()
        graphs_before = graphs_compiled()
        for length in self.buckets.lengths:
            if stop is not None and stop.is_set():
                return
            if self.regional.state(length) == "compiling":
                self.compile_length(length)
                if on_length is not None:
                    on_length(length, self.regional.state(length))
        self.compile_seconds = time.perf_counter() - started
        log.info(
            "%d of %d bucket lengths compiled (%d graphs, torch.compile mode %s) in %.1fs%s",
            len(self.regional.ready),
            len(self.buckets.lengths),
            graphs_compiled() - graphs_before,
            self.compile_mode,
            self.compile_seconds,
            f"; eager for good: {sorted(self.regional.failed)}" if self.regional.failed else "",
        )

    def compile_length(self, length: int) -> None:
        """Compile (or load from the cache) the layer for one bucket length, at its smallest and largest row
        counts, then mark it ready; on failure mark it failed, and log why either way."""
        assert self.buckets is not None
        regional = self.regional
        started = time.perf_counter()
        graphs_before = graphs_compiled()
        hits_before, misses_before = fx_graph_cache_counts()
        short = self.tokenize(["warmup"])[0].ids
        ladder = self.buckets.row_ladder(length)
        try:
            with torch.inference_mode(), regional.active():
                for rows in sorted({max(ladder[0], MIN_DYNAMIC_ROWS), max(ladder[-1], MIN_DYNAMIC_ROWS)}):
                    input_ids, attention_mask = self._padded([short] * rows, rows, length)
                    attention_mask[:, : len(short)] = 1
                    input_ids, attention_mask = self._to_device(input_ids, attention_mask)
                    self._embed(input_ids, attention_mask)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as error:  # e.g. an inductor failure: this length stays eager, the server serves
            regional.failed[length] = _root_cause(error)
            log.warning("bucket length %d runs eager: its compilation failed (%s)", length, regional.failed[length])
            return
        regional.ready.add(length)
        hits, misses = fx_graph_cache_counts()
        log.info(
            "bucket length %d compiled in %.1fs: %d graphs, %d loaded from the compile cache, %d compiled anew",
            length,
            time.perf_counter() - started,
            graphs_compiled() - graphs_before,
            hits - hits_before,
            misses - misses_before,
        )

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0


def _root_cause(error: BaseException) -> str:
    """The innermost exception of a chain, in one line: dynamo wraps a backend's error in its own."""
    while error.__cause__ is not None or getattr(error, "inner_exception", None) is not None:
        error = error.__cause__ or error.inner_exception  # type: ignore[attr-defined]
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return device


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ModelLoadError(f"dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return names[dtype]


def _pooling_mode(folder: Path) -> str:
    config = _read_json(folder / "config.json") or {}
    assert isinstance(config, dict)
    if config.get("include_prompt", True) is False:
        raise ModelLoadError(f"{folder}: pooling that excludes the prompt is not supported")
    if config.get("pooling_mode_mean_tokens", True):
        return "mean"
    if config.get("pooling_mode_cls_token"):
        return "cls"
    raise ModelLoadError(f"{folder}: only mean and CLS pooling are supported, got {config}")


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _prompts_from_folder(folder: Path) -> PromptTemplates | None:
    """Prompt templates from sentence-transformers' config_sentence_transformers.json, if it has any."""
    config = _read_json(folder / "config_sentence_transformers.json")
    prompts = config.get("prompts") if isinstance(config, dict) else None
    if not prompts:
        return None
    query = _escape(prompts.get("query", "")) + "{text}"
    document = _escape(prompts.get("document", prompts.get("passage", "")))
    # The model card writes a passage's title into the prompt ("title: none | text: "); put it back.
    titled = document.replace("title: none", "title: {title}") if "title: none" in document else document + "{title} "
    return PromptTemplates(query=query, passage=titled + "{text}", passage_untitled=document + "{text}")


def _model_max_tokens(folder: Path, config: Any, tokenizer: Any) -> int:
    """sentence-transformers' max_seq_length if the folder has one (published scores depend on it),
    else the smaller of the model's position limit and the tokenizer's limit."""
    st_config = _read_json(folder / "sentence_bert_config.json")
    if isinstance(st_config, dict) and st_config.get("max_seq_length"):
        return int(st_config["max_seq_length"])
    limits = [int(getattr(config, "max_position_embeddings", 0) or 0)]
    tokenizer_limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
    if 0 < tokenizer_limit < 1_000_000:  # transformers uses a huge sentinel for "no limit"
        limits.append(tokenizer_limit)
    limits = [limit for limit in limits if limit > 0]
    return min(limits) if limits else 512
