"""scholarembed server: the embedding engine, its batcher and the gRPC doors to it."""

__version__ = "0.1.0"
