"""scholarembed client: typed access to a scholarembed server (light: grpcio, protobuf, numpy; never torch)."""

from . import filters
from ._client import (
    AsyncClient,
    Client,
    Collection,
    EmbedResult,
    Encoding,
    Hit,
    InputType,
    ListRank,
    ModelInfo,
    Passage,
    Truncation,
    UpsertAck,
    decode,
)
from .errors import (
    AuthenticationError,
    DeadlineExceededError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    ScholarEmbedError,
    UnavailableError,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "Collection",
    "DeadlineExceededError",
    "EmbedResult",
    "Encoding",
    "FieldViolation",
    "Hit",
    "InputType",
    "InternalError",
    "InvalidArgumentError",
    "ListRank",
    "ModelInfo",
    "NotFoundError",
    "Passage",
    "ResourceExhaustedError",
    "ScholarEmbedError",
    "Truncation",
    "UnavailableError",
    "UpsertAck",
    "decode",
    "filters",
]
