"""tlserve: transfer-learn a torchvision backbone, export one verified ONNX file, serve it over gRPC."""

__version__ = "0.1.0"
