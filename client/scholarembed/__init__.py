"""scholarembed client: typed access to a scholarembed server (light: grpcio, protobuf, numpy; never torch)."""

from ._client import (
    AsyncClient,
    Client,
    EmbedResult,
    Encoding,
    InputType,
    ModelInfo,
    Truncation,
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
    "DeadlineExceededError",
    "EmbedResult",
    "Encoding",
    "FieldViolation",
    "InputType",
    "InternalError",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "ResourceExhaustedError",
    "ScholarEmbedError",
    "Truncation",
    "UnavailableError",
    "decode",
]
