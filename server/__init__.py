"""Serving: ONNX Runtime behind gRPC with Prometheus metrics. Never imports torch, trainer or export."""
