"""The HTTP door's own JSON bodies as pydantic models (OpenAI's embeddings, models, errors, health): they
validate the request's shape (types, enums, ranges) and make the served OpenAPI document describe every
field, so generated clients are typed. /v1/search's bodies are the proto's (see `protojson`).

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
        "`raw` (no prompt). Omitted: the model alias's suffix (`<model>:query`, `<model>:passage`); with "
        "neither, a 400 (the model is asymmetric), unless the server sets --http-default-input-type.",
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
    truncation: Literal["end", "error"] = Field(
        "end",
        description="A text over the model's max_tokens (prompt included): `end` cuts it (the default), "
        "`error` refuses the request with a 400 naming the text.",
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
