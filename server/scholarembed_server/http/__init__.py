"""The HTTP door: OpenAI-compatible embeddings, JSON search and health over the shared engine, batcher and
index, served by uvicorn in the gRPC server's own event loop. Needs the `http` extra (fastapi, uvicorn)."""

from .server import HttpDoor

__all__ = ["HttpDoor"]
