"""EmbeddingService over gRPC: a thin door over the shared `TextEmbedder` (validation, prompts, batching).

Domain errors become gRPC statuses in `status.to_rpc_status` (unary calls: in the trailers; streams:
in-band in EmbedStreamResponse.error).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from scholarembed.v1 import embedding_pb2 as pb
from scholarembed.v1 import embedding_pb2_grpc as pb_grpc

from .. import logs
from ..config import ServerConfig
from ..embedder import TextEmbedder, model_info
from ..errors import InvalidArgumentError
from ..metrics import Metrics
from .status import to_rpc_status, unary
from .streams import ordered_stream


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
        with self._metrics.track("EmbedStream", context):
            async for response in ordered_stream(request_iterator, self._answer, self._config.stream_window):
                yield response

    async def _answer(self, message: pb.EmbedStreamRequest) -> pb.EmbedStreamResponse:
        logs.request_id.set(f"{logs.request_id.get()}/{message.request_id}")  # this task's own context
        try:
            if not message.HasField("request"):
                raise InvalidArgumentError("request", "missing: every EmbedStreamRequest carries an EmbedRequest")
            response = await self._embedder.embed_request(message.request, wait=True)
            return pb.EmbedStreamResponse(request_id=message.request_id, response=response)
        except Exception as error:
            return pb.EmbedStreamResponse(request_id=message.request_id, error=to_rpc_status(error))

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        with self._metrics.track("GetModelInfo", context):
            return model_info(self._embedder.engine, self._config)
