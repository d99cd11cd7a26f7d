"""Policy service: vLLM AsyncLLM behind gRPC Generate (unary and streaming)."""
