"""The Open Inference Protocol (KServe v2) front end, with Triton's ModelConfig and ModelStatistics."""
