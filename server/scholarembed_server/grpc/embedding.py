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
from .status import unary
from .streams import in_band, ordered_stream, wrapped_request


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(self, embedder: TextEmbedder, config: ServerConfig, metrics: Metrics) -> None:
        self._embedder = embedder
        self._config = config
        self._metrics = metrics

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return await unary(self._metrics, "Embed", context, self._embedder.embed_request(request, wait=False))

    async def EmbedStream(
        self, request_iterator: AsyncIterator[pb.EmbedStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        async def embed(message: pb.EmbedStreamRequest) -> pb.EmbedResponse:
            return await self._embedder.embed_request(wrapped_request(message), wait=True)

        async def answer(message: pb.EmbedStreamRequest) -> pb.EmbedStreamResponse:
            return await in_band(pb.EmbedStreamResponse, message.request_id, "response", embed(message))

        with self._metrics.track("EmbedStream", context):
            async for response in ordered_stream(request_iterator, answer, self._config.stream_window):
                yield response

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        with self._metrics.track("GetModelInfo", context):
            return model_info(self._embedder.engine, self._config)
