"""Every Prometheus metric of docs/server-contract.md, built on an injected CollectorRegistry
(the NVML GPU gauges are a scrape-time collector in gpu.py)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# top-1 probabilities: coarse below 0.5 (1/C is the floor), fine near 1 where a healthy classifier lives
CONFIDENCE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99, 0.999)


class Metrics:
    """The server's metrics; one instance per server, passed down to whoever records."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "tlserve_requests",
            "Requests by RPC, model and gRPC status code",
            ("rpc", "model", "code"),
            registry=registry,
        )
        self.request_duration = Histogram(
            "tlserve_request_duration_seconds",
            "Request duration",
            ("rpc", "model"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "tlserve_queue_duration_seconds",
            "Time a request waited in the batch queue",
            ("model",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "tlserve_inference_duration_seconds",
            "ONNX Runtime time per batch",
            ("model",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "tlserve_batch_size", "Images per executed batch", ("model",), buckets=BATCH_BUCKETS, registry=registry
        )
        self.queue_depth = Gauge(
            "tlserve_queue_depth", "Requests waiting in the batch queue", ("model",), registry=registry
        )
        self.inflight = Gauge("tlserve_inflight_requests", "Requests being handled", ("model",), registry=registry)
        self.queue_rejections = Counter(
            "tlserve_queue_rejections", "Requests refused because the queue was full", ("model",), registry=registry
        )
        self.decode_bytes = Gauge(
            "tlserve_decode_admitted_bytes", "Decoding memory reserved by admitted requests", registry=registry
        )
        self.decode_rejections = Counter(
            "tlserve_decode_rejections", "Requests refused because the decode budget was full", registry=registry
        )
        self.message_bytes = Gauge(
            "tlserve_message_memory_bytes",
            "Memory reserved for parsing and converting the request messages being handled",
            registry=registry,
        )
        self.message_rejections = Counter(
            "tlserve_message_memory_rejections",
            "Requests refused because the message memory budget was full",
            registry=registry,
        )
        self.model_ready = Gauge(
            "tlserve_model_ready", "1 while the model version is ready", ("model", "version"), registry=registry
        )
        self.model_load_failures = Counter(
            "tlserve_model_load_failures", "Model versions that failed to load", ("model",), registry=registry
        )
        self.model_info = Gauge(
            "tlserve_model_info",
            "Loaded model versions (always 1)",
            ("model", "version", "provider", "precision"),
            registry=registry,
        )
        self.inference_stuck = Counter(
            "tlserve_inference_stuck",
            "session.run calls that outlasted --inference-timeout-seconds (the model turns NOT_SERVING)",
            ("model",),
            registry=registry,
        )
        self.model_file_changed = Counter(
            "tlserve_model_file_changed",
            "Files of a loaded version that changed on disk, by what was done (reloaded, refused)",
            ("model", "version", "action"),
            registry=registry,
        )
        self.cuda_fallback = Gauge(
            "tlserve_cuda_fallback", "1 when CUDA was asked for and the CPU is in use", ("model",), registry=registry
        )
        self.prediction_confidence = Histogram(
            "tlserve_prediction_confidence",
            "Top-1 probability of every served prediction",
            ("model", "version"),
            buckets=CONFIDENCE_BUCKETS,
            registry=registry,
        )
        self.predictions = Counter(
            "tlserve_predictions",
            "Served predictions by top-1 label (only for models with at most --max-label-metrics labels)",
            ("model", "version", "label"),
            registry=registry,
        )
        self.confidence_baseline = Gauge(
            "tlserve_confidence_baseline",
            "Top-1 probability at each quantile on the validation split, from the model's manifest",
            ("model", "version", "quantile_level"),
            registry=registry,
        )
        self.prediction_share_baseline = Gauge(
            "tlserve_prediction_share_baseline",
            "Share of validation images predicted as each label, from the manifest (--max-label-metrics applies)",
            ("model", "version", "label"),
            registry=registry,
        )
        self._rpc_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.auth_refusals = Counter(
            "tlserve_auth_refusals",
            "Calls refused by token auth, by RPC and reason (missing, invalid, scope)",
            ("rpc", "reason"),
            registry=registry,
        )

    def rpc_children(self, rpc: str, model: str, code: str) -> tuple[Any, Any]:
        """The ``requests`` counter and ``request_duration`` histogram of one (rpc, model, code), looked
        up once (``labels()`` validates and locks on every call); the keys are bounded: fixed RPC
        names, loaded model names (or ""), status codes. Call it on the event loop."""
        key = (rpc, model, code)
        children = self._rpc_children.get(key)
        if children is None:
            children = self._rpc_children[key] = (
                self.requests.labels(rpc, model, code),
                self.request_duration.labels(rpc, model),
            )
        return children
