"""The reward service: gRPC Score over the registered reward model, with dynamic batching and hot swap."""
