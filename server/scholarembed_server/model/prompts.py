"""Input types and the prompt templates that turn a text into what the model reads."""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class InputType(enum.Enum):
    QUERY = "query"
    PASSAGE = "passage"
    RAW = "raw"


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


def prompts_from_folder(folder: Path) -> PromptTemplates | None:
    """Prompt templates from sentence-transformers' config_sentence_transformers.json, if it has any."""
    path = folder / "config_sentence_transformers.json"
    config = json.loads(path.read_text()) if path.exists() else None
    prompts = config.get("prompts") if isinstance(config, dict) else None
    if not prompts:
        return None
    query = _escape(prompts.get("query", "")) + "{text}"
    document = _escape(prompts.get("document", prompts.get("passage", "")))
    # The model card writes a passage's title into the prompt ("title: none | text: "); put it back.
    titled = document.replace("title: none", "title: {title}") if "title: none" in document else document + "{title} "
    return PromptTemplates(query=query, passage=titled + "{text}", passage_untitled=document + "{text}")


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")
