"""EmbeddingService over gRPC: a thin door over the shared `TextEmbedder` (validation, prompts, batching).

Domain errors become gRPC statuses in `status.to_rpc_status` (unary calls: in the trailers; streams:
in-band in EmbedStreamResponse.error).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from scholarembed.v1 import embedding_pb2 as pb
from scholarembed.v1 import embedding_pb2_grpc as pb_grpc

from ..config import ServerConfig
from ..embedder import TextEmbedder, model_info
from ..metrics import Metrics
from .admission import CallGate
from .status import unary
from .streams import in_band, serve_stream, wrapped_request


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(self, embedder: TextEmbedder, config: ServerConfig, metrics: Metrics, gate: CallGate) -> None:
        self._embedder = embedder
        self._config = config
        self._metrics = metrics
        self._gate = gate

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return await unary(
            self._gate, self._metrics, "Embed", context, lambda: self._embedder.embed_request(request, wait=False)
        )

    async def EmbedStream(
        self, request_iterator: AsyncIterator[pb.EmbedStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        async def embed(message: pb.EmbedStreamRequest) -> pb.EmbedResponse:
            return await self._embedder.embed_request(wrapped_request(message), wait=True)

        async def answer(message: pb.EmbedStreamRequest) -> pb.EmbedStreamResponse:
            return await in_band(pb.EmbedStreamResponse, message.request_id, "response", embed(message))

        async for response in serve_stream(
            self._gate, self._metrics, "EmbedStream", context, request_iterator, answer, self._config.stream_window
        ):
            yield response

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        async def info() -> pb.GetModelInfoResponse:
            return model_info(self._embedder.engine, self._config)

        return await unary(self._gate, self._metrics, "GetModelInfo", context, info)
