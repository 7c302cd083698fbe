"""Tokenization: prompted texts -> token ids within the model's limit, safe to call from many threads."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgumentError


class Truncation(enum.Enum):
    END = "end"  # keep the first max_tokens tokens and flag the text
    ERROR = "error"  # reject the text


@dataclass(frozen=True)
class TokenizedText:
    ids: list[int]
    truncated: bool


class Tokenization:
    """The model's tokenizer behind one thread-safe call, `tokenize`.

    Several threads tokenize at once (the server's tokenizer threads overlap the forward pass). A fast
    tokenizer's truncation and padding are settings on the shared object, so they are settled once here
    (neither is on) and never changed again: a `truncation=True` call on one thread would otherwise cut
    another thread's text, and the next `truncation=False` call would let a third one through uncut.
    Over-long texts are cut on their encoding instead (`_cut`).
    """

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        # A tokenizer.json may enable truncation or padding; one call with both off settles them for good.
        tokenizer(["."], truncation=False, return_attention_mask=False)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0

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
        first, then the special tokens (e.g. EOS) around them, so they survive."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a Python tokenizer: its truncation is per call, not shared state
            ids: list[int] = self.tokenizer(
                text, add_special_tokens=True, truncation=True, max_length=self.max_tokens, return_attention_mask=False
            )["input_ids"]
            return ids
        encoding = backend.encode(text, add_special_tokens=False)
        encoding.truncate(self.max_tokens - backend.num_special_tokens_to_add(is_pair=False))
        return list(backend.post_process(encoding, add_special_tokens=True).ids)
