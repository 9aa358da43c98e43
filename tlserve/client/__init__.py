"""Python client of the tlserve task API (``tlserve.v1.Inference``): blocking :class:`Client` and asyncio
:class:`AsyncClient`, TLS/mTLS and bearer tokens (:class:`ChannelSecurity`), per-call deadlines, and
retries on UNAVAILABLE and RESOURCE_EXHAUSTED by gRPC's own retry policy (:class:`RetryPolicy`).

Needs only the ``client`` extra (grpcio, grpcio-health-checking, protobuf, numpy; Pillow for PIL images
and [H, W, C] arrays): never onnxruntime or torch. See docs/client.md.

    from tlserve.client import Client

    with Client("localhost:50051") as client:
        print(client.classify("cat.png", top_k=3).results[0].top.label)
"""

from tlserve.client.aio import AsyncClient
from tlserve.client.channel import NO_RETRIES, ChannelSecurity, RetryPolicy, open_channel, read_token_file
from tlserve.client.files import LabelledFile, find_images
from tlserve.client.health import wait_ready
from tlserve.client.results import Classification, Classified, Embedded, Prediction
from tlserve.client.sync import Client

__all__ = [
    "NO_RETRIES",
    "AsyncClient",
    "ChannelSecurity",
    "Classification",
    "Classified",
    "Client",
    "Embedded",
    "LabelledFile",
    "Prediction",
    "RetryPolicy",
    "find_images",
    "open_channel",
    "read_token_file",
    "wait_ready",
]
