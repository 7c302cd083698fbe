"""Domain errors. The engine and batcher raise these; servicers map them to gRPC in one place."""

from __future__ import annotations

import grpc


class ScholarEmbedError(Exception):
    """Base class: every subclass knows its gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgumentError(ScholarEmbedError):
    """A request field is wrong. `field` is the path of the offending field, e.g. "texts[3]"."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description

    def __reduce__(self) -> tuple[type[InvalidArgumentError], tuple[str, str]]:
        # Picklable as itself (Ray carries an actor's error to the driver): rebuilt from field and description.
        return type(self), (self.field, self.description)


class RetryLaterError(ScholarEmbedError):
    """The server is busy: the caller should retry after `retry_after_s` (sent as google.rpc.RetryInfo)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float = 0.5) -> None:
        super().__init__(f"{message}; retry in {retry_after_s}s")
        self.retry_after_s = retry_after_s


class QueueFullError(RetryLaterError):
    """The token-bounded queue cannot take a unary request now."""

    def __init__(self, queued_tokens: int, max_queue_tokens: int, retry_after_s: float = 0.5) -> None:
        super().__init__(f"server busy: {queued_tokens} tokens queued of a {max_queue_tokens} limit", retry_after_s)


class TooManyCallsError(RetryLaterError):
    """--max-concurrent-rpcs calls are in progress: a unary call is refused (a stream waits instead)."""

    def __init__(self, calls: int, retry_after_s: float = 0.5) -> None:
        super().__init__(f"server busy: {calls} calls in progress, the limit", retry_after_s)


class InputTooLargeError(ScholarEmbedError):
    """One input cannot be embedded within the accelerator's memory, even alone."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(ScholarEmbedError):
    """The server is warming up or draining."""

    code = grpc.StatusCode.UNAVAILABLE


class ServerBrokenError(UnavailableError):
    """The server hit a fatal failure (see `lifecycle`) and is exiting: retry on another replica."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"server is broken and exiting ({cause}): retry on another replica")
        self.cause = cause


class ModelLoadError(ScholarEmbedError):
    """The model could not be found or loaded; raised at startup, never per request."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class FailedPreconditionError(ScholarEmbedError):
    """The request is valid but the system is not in a state to run it, e.g. a collection written by
    another model or at another dimension."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class SearchDisabledError(ScholarEmbedError):
    """A search call on a server started without a passage store; the same words on every door."""

    code = grpc.StatusCode.UNIMPLEMENTED

    def __init__(self) -> None:
        super().__init__(
            "search is not enabled on this server (started with --no-index): restart it without --no-index "
            "for the embedded store, or with --data-dir DIR or --index-uri URI"
        )
