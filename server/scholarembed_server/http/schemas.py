"""The HTTP door's JSON bodies as pydantic models: they validate the request's shape (types, enums, ranges)
and make the served OpenAPI document describe every field, so generated clients are typed.

What the values mean (empty texts, dimensions, limits) is checked once, by the shared embedder and
searcher, exactly as for gRPC.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

UINT32_MAX = 2**32 - 1  # the protos' uint32 fields


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request, plus NIM/vLLM's `input_type` and this model's `titles`."""

    model_config = ConfigDict(
        extra="forbid",  # a misspelt field ("dimension") gets a 400 naming it, not silently ignored
        json_schema_extra={
            "examples": [{"model": "LinerAI/embeddinggemma-300m-academic", "input": ["protein folding"]}]
        },
    )

    input: str | list[str] = Field(
        description="A text or a list of texts, 1 to the server's max_texts_per_request (GET /v1/models). "
        "Empty or whitespace-only texts are a 400. Token-id arrays are refused with a 400: send text."
    )
    model: str | None = Field(
        None,
        description="The served model id (GET /v1/models), optionally with a `:query` or `:passage` suffix "
        "that chooses the prompt, for clients that cannot send input_type. Omitted: the served model.",
    )
    input_type: Literal["query", "passage", "raw"] | None = Field(
        None,
        description="The prompt: `query` (search queries), `passage` (documents, with optional titles) or "
        "`raw` (no prompt). Omitted: the model alias's suffix, else the server's --http-default-input-type "
        "(passage unless configured).",
    )
    titles: list[str] | None = Field(
        None, description="One title per input, with input_type passage only; an empty title means none."
    )
    dimensions: int | None = Field(
        None,
        ge=1,
        le=UINT32_MAX,
        description="Matryoshka output size, one of the model's matryoshka_dimensions; omitted: full size. "
        "Truncated vectors are re-normalised.",
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float",
        description="`float`: JSON numbers. `base64`: the base64 of little-endian float32 bytes, as OpenAI.",
    )
    user: str | None = Field(None, description="Accepted for OpenAI compatibility; not used.")

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_arrays(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(item, int | list) for item in value):
            raise ValueError("token-id arrays are not accepted: send the text (a string or a list of strings)")
        return value


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int = Field(description="Position of the input this vector belongs to.")
    embedding: list[float] | str = Field(
        description="Unit-length vector: floats, or base64 of little-endian float32 (encoding_format)."
    )


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens the model saw, prompts and special tokens included.")
    total_tokens: int = Field(description="Equal to prompt_tokens: embeddings generate nothing.")


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData] = Field(description="One per input, in input order.")
    model: str
    usage: EmbeddingsUsage


class ModelCard(BaseModel):
    id: str = Field(description="Send as `model`; the `:query` and `:passage` ids choose the prompt.")
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "scholarembed"
    dimensions: int = Field(description="Full vector size.")
    matryoshka_dimensions: list[int] = Field(description="Allowed values of `dimensions`.")
    max_tokens: int = Field(description="Longest input in tokens, prompt included; longer inputs are truncated.")
    max_texts_per_request: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SearchRequest(BaseModel):
    """scholarembed.v1.SearchRequest as JSON: the same fields, defaults, validation and errors as the Search RPC."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"collection": "scifact", "queries": ["gene therapy"], "top_k": 10}]},
    )

    collection: str = Field("", description="Collection name; 404 if it does not exist.")
    queries: list[str] = Field(
        default_factory=list,
        description="Query texts, embedded with the query prompt: 1 to max_texts_per_request, each non-empty.",
    )
    top_k: int = Field(
        0, ge=0, le=UINT32_MAX, description="Hits per query: 1 to the server's max_top_k (default 1000)."
    )
    dimensions: int = Field(0, ge=0, le=UINT32_MAX, description="Matryoshka dimension to search at; 0 means full size.")
    include_passages: bool = Field(False, description="Return each hit's title, text and metadata.")
    filter: dict[str, str] = Field(
        default_factory=dict, description="Exact-match metadata filter: every key must have exactly this value."
    )


class Hit(BaseModel):
    id: str
    score: float = Field(description="Cosine similarity at the searched dimension, in [-1, 1].")
    title: str = Field("", description="With include_passages; else empty.")
    text: str = Field("", description="With include_passages; else empty.")
    metadata: dict[str, str] = Field(default_factory=dict, description="With include_passages; else empty.")


class QueryResult(BaseModel):
    hits: list[Hit] = Field(description="At most top_k hits, best first.")


class SearchResponse(BaseModel):
    results: list[QueryResult] = Field(description="One per query, in query order.")


class ErrorDetail(BaseModel):
    message: str = Field(description="What is wrong, naming the field, e.g. `input[2]: must not be empty`.")
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, ...")
    param: str | None = Field(None, description="The offending request field, when one is to blame.")
    code: str = Field(description="The gRPC status name of the same error, lower case: invalid_argument, ...")


class ErrorResponse(BaseModel):
    """OpenAI's error body; every non-2xx answer of this door has it."""

    error: ErrorDetail


class HealthStatus(BaseModel):
    status: Literal["alive", "ready", "warming_up", "draining"]
