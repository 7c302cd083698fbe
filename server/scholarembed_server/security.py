"""Who may call: TLS / mTLS server credentials and a bearer-token interceptor."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from .config import ServerConfig

log = logging.getLogger(__name__)

# Probes (load balancers, Kubernetes) and tooling (grpcurl) can be let in without a token.
PROBE_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                  "/grpc.reflection.v1.ServerReflection/")  # fmt: skip


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS when --tls-cert/--tls-key are given; mTLS (client certificate required) with --tls-client-ca."""
    if not config.tls_cert and not config.tls_key:
        if config.tls_client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def bearer_token_accepted(authorization: str, accepted_tokens: Sequence[bytes]) -> bool:
    """Whether an `authorization` header or metadata value is `Bearer <one of the accepted tokens>`;
    every door checks tokens with this."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Compare with every token in constant time, so timing reveals nothing.
    return any([hmac.compare_digest(token.encode(), accepted) for accepted in accepted_tokens])


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Reject calls without `authorization: Bearer <token>` for one of the accepted tokens (UNAUTHENTICATED)."""

    def __init__(self, tokens: Sequence[str], *, open_probes: bool) -> None:
        if not tokens:
            raise ValueError("no auth tokens configured")
        self._tokens = [token.encode() for token in tokens]
        self._open_probes = open_probes

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                return bearer_token_accepted(value.decode() if isinstance(value, bytes) else value, self._tokens)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if (self._open_probes and method.startswith(PROBE_PREFIXES)) or self._authorized(
            handler_call_details.invocation_metadata  # type: ignore[arg-type]
        ):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _deny(handler)


def _deny(handler: Any) -> Any:
    message = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"

    async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    if handler is None:
        return None
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny_unary, **serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny_unary, **serializers)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **serializers)
