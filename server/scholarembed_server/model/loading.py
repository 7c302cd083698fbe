"""Loading: a model folder or hub id -> an immutable `LoadedModel`, everything it takes to embed.

The encoder is loaded by transformers; the sentence-transformers modules after it (modules.json: Pooling,
Dense, Normalize) are read by sentence-transformers' own classes, so their configs and weights mean what they
mean there. Loading is strict: a missing, unexpected or mis-shaped weight is an error, never a random layer.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DEFAULT_MODEL
from ..errors import ModelLoadError
from .compilation import install_layer_dispatch
from .prompts import EMBEDDINGGEMMA_PROMPTS, PromptTemplates, prompts_from_folder
from .tokenization import Tokenization

log = logging.getLogger(__name__)

EMBEDDINGGEMMA_MATRYOSHKA_DIMS = (768, 512, 256, 128)


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model and everything about it that never changes while it serves: weights (the encoder and
    the Dense head), the tokenizer, prompts, pooling, dimensions and limits. `embed` is its computation."""

    encoder: nn.Module
    head: nn.Sequential  # sentence-transformers Dense layers after pooling, in fp32 (tiny); empty for none
    tokenization: Tokenization
    model_id: str
    source: str
    device: torch.device
    dtype: torch.dtype
    max_tokens: int
    prompts: PromptTemplates
    matryoshka_dims: tuple[int, ...]  # descending; the first is the full size
    pooling: str = "mean"  # or "cls"

    @property
    def dimensions(self) -> int:
        return self.matryoshka_dims[0]

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Padded ids and mask on the device -> unit vectors (rows, full dims) on the device: the one forward,
        pool, Dense and normalise, for the eager and the compiled path alike."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = pool(hidden.float(), attention_mask.bool(), self.pooling)
        return F.normalize(self.head(pooled), p=2, dim=-1)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    # torch.where, not hidden * mask: a NaN or inf in a padded position must not leak into the sum.
    summed = torch.where(mask.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    counts = mask.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)
    return summed.sum(dim=1) / counts


class _DenseLayer(nn.Module):
    """A sentence-transformers Dense module as a plain tensor -> tensor layer (its own forward takes a dict)."""

    def __init__(self, dense: Any) -> None:
        super().__init__()
        self.linear = dense.linear
        self.activation = dense.activation_function

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(features))


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    max_tokens: int | None = None,
    revision: str | None = None,
    matryoshka_dims: Sequence[int] | None = None,
    prompts: PromptTemplates | None = None,
    served_model_name: str | None = None,
) -> LoadedModel:
    """Load `model` (hub id or folder) onto `device`; raises ModelLoadError saying what is wrong."""
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
        encoder, loading_info = AutoModel.from_pretrained(
            folder, config=config, dtype=torch_dtype, attn_implementation="sdpa", output_loading_info=True
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"model {model!r} could not be loaded from {folder}: {error}") from error
    _check_weights(model, loading_info)
    encoder.to(torch_device).eval()
    # An encoder needs no KV cache; one would also give each layer its own compilation (its index is read).
    if hasattr(encoder.config, "use_cache"):
        encoder.config.use_cache = False
    install_layer_dispatch(encoder)

    pooling, dense_layers = _sentence_transformers_modules(folder)
    head = nn.Sequential(*dense_layers).to(torch_device).eval()

    hidden_size = int(encoder.config.hidden_size)
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
        prompts = prompts_from_folder(folder) or (
            EMBEDDINGGEMMA_PROMPTS if family_is_embeddinggemma else PromptTemplates()
        )
    limit = _model_max_tokens(folder, encoder.config, tokenizer)
    if max_tokens:
        position_limit = getattr(encoder.config, "max_position_embeddings", None) or max_tokens
        limit = min(max_tokens, int(position_limit))
    # The id clients see and collections record: the operator's name for it (--served-model-name, as in
    # vLLM and TEI), else the hub id, else the folder's path. Never config.json's _name_or_path: it names
    # the checkpoint a model was trained from (all-MiniLM-L6-v2's says nreimers/MiniLM-L6-H384-uncased),
    # so a fine-tune would pass for its base, and share its collections.
    model_id = served_model_name or (source if Path(model).expanduser().is_dir() else model)
    loaded = LoadedModel(
        encoder=encoder,
        head=head,
        tokenization=Tokenization(tokenizer, limit),
        model_id=model_id,
        source=source,
        device=torch_device,
        dtype=torch_dtype,
        max_tokens=limit,
        prompts=prompts,
        matryoshka_dims=dims,
        pooling=pooling,
    )
    log.info("loaded %s from %s on %s (%s): %d dims, max %d tokens", model_id, source, torch_device, torch_dtype,
             dims[0], limit)  # fmt: skip
    return loaded


def _check_weights(model: str, loading_info: dict[str, Any]) -> None:
    """Strict loading: transformers would fill a missing weight with random values and drop an unexpected one."""
    problems = {
        kind: sorted(loading_info.get(key) or ())
        for kind, key in (
            ("missing", "missing_keys"),
            ("unexpected", "unexpected_keys"),
            ("mis-shaped", "mismatched_keys"),
        )
    }
    found = [f"{kind} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for kind, keys in problems.items() if keys]
    if found:
        raise ModelLoadError(f"model {model!r}: its weights do not match its config: {'; '.join(found)}")


def _sentence_transformers_modules(folder: Path) -> tuple[str, list[nn.Module]]:
    """(pooling mode, Dense layers) of the sentence-transformers pipeline in modules.json, read by its own
    module classes. A folder without modules.json is a bare encoder: mean pooling, no Dense."""
    modules = _read_json(folder / "modules.json")
    if not modules:
        return "mean", []
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from sentence_transformers.util import import_from_string

    pooling = "mean"
    dense_layers: list[nn.Module] = []
    for entry in modules:
        assert isinstance(entry, dict)
        module_class = import_from_string(entry["type"])
        module_folder = str(folder / entry.get("path", ""))
        try:
            if issubclass(module_class, Transformer):
                continue  # the encoder itself, loaded by transformers
            if issubclass(module_class, Normalize):
                continue  # vectors are always normalised, after Matryoshka truncation too
            if issubclass(module_class, Pooling):
                pooling = _pooling_mode(Pooling.load(module_folder), module_folder)
            elif issubclass(module_class, Dense):
                dense_layers.append(_DenseLayer(Dense.load(module_folder)))
            else:
                raise ModelLoadError(f"{folder}: sentence-transformers module {entry['type']} is not supported")
        except (OSError, ValueError, RuntimeError) as error:  # e.g. a Dense whose weights do not match its config
            raise ModelLoadError(f"{module_folder}: {error}") from error
    return pooling, dense_layers


def _pooling_mode(pooling: Any, folder: str) -> str:
    if not pooling.include_prompt:
        raise ModelLoadError(f"{folder}: pooling that excludes the prompt is not supported")
    mode = pooling.get_pooling_mode_str() if hasattr(pooling, "get_pooling_mode_str") else pooling.pooling_mode
    if mode not in ("mean", "cls"):
        raise ModelLoadError(f"{folder}: only mean and CLS pooling are supported, got {mode!r}")
    return str(mode)


def _read_json(path: Path) -> Any:
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
