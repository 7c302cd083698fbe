"""The gRPC door: EmbeddingService and SearchService servicers over the shared embedder and searcher,
and the one mapping of domain errors to gRPC statuses."""
