"""An independent implementation of the model card's code, the correctness oracle.

One text per forward pass, no padding, plain mean over all tokens (or the first token, for CLS pooling),
the sentence-transformers Dense layers (weight, bias, activation) read straight from their files,
L2-normalise; Matryoshka: truncate, then re-normalise.
It shares no code with scholarembed_server on purpose.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import torch

QUERY_PROMPT = "task: search result | query: "
PASSAGE_PROMPT = "title: {title} | text: "


def card_query(text: str) -> str:
    return QUERY_PROMPT + text


def card_passage(text: str, title: str = "") -> str:
    return PASSAGE_PROMPT.format(title=title or "none") + text


class ModelCard:
    def __init__(self, folder: Path, max_length: int | None = None) -> None:
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        self.max_length = max_length
        self.cls_pooling = False
        self.dense: list[tuple[torch.Tensor, torch.Tensor | None, torch.nn.Module]] = []  # weight, bias, activation
        modules_path = folder / "modules.json"
        modules = json.loads(modules_path.read_text()) if modules_path.exists() else []
        for module in modules:
            if module["type"].endswith(".Pooling"):
                pooling = json.loads((folder / module["path"] / "config.json").read_text())
                self.cls_pooling = bool(pooling.get("pooling_mode_cls_token")) and not pooling.get(
                    "pooling_mode_mean_tokens"
                )
            if module["type"].endswith(".Dense"):
                config = json.loads((folder / module["path"] / "config.json").read_text())
                tensors = load_file(str(folder / module["path"] / "model.safetensors"))
                module_path, _, class_name = config.get("activation_function", "torch.nn.Identity").rpartition(".")
                activation = getattr(importlib.import_module(module_path), class_name)()
                bias = tensors["linear.bias"] if config.get("bias", True) else None
                self.dense.append((tensors["linear.weight"], bias, activation))

    @torch.inference_mode()
    def embed(self, text: str, dimensions: int | None = None) -> np.ndarray:
        inputs = self.tokenizer(
            text, return_tensors="pt", truncation=self.max_length is not None, max_length=self.max_length
        )
        hidden = self.model(**inputs).last_hidden_state[0]
        vector = hidden[0] if self.cls_pooling else hidden.mean(dim=0)
        for weight, bias, activation in self.dense:
            vector = activation(weight @ vector + (0 if bias is None else bias))
        vector = vector / vector.norm()
        if dimensions:
            vector = vector[:dimensions] / vector[:dimensions].norm()
        return vector.numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.atleast_2d(a).astype(np.float64)
    b = np.atleast_2d(b).astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
