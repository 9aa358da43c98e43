"""Export: a checkpoint becomes one verified, self-describing ONNX file (needs the `train` extra)."""
