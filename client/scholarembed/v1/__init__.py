"""Generated protobuf and gRPC stubs for scholarembed.v1 (from protos/; regenerate with `make protos`)."""
