"""Request messages and call arguments shared by the blocking and the asyncio client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tlserve.client.images import to_images
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb

DEFAULT_TIMEOUT = 30.0  # seconds: every call has a deadline unless the caller gives None


@dataclass(frozen=True)
class Target:
    """Which model a call asks for: "" means the server's only model, and its newest ready version."""

    model: str = ""
    version: str = ""

    def ref(self, model: str | None, version: str | None) -> pb.ModelRef:
        return pb.ModelRef(
            name=self.model if model is None else model, version=self.version if version is None else version
        )


def classify_request(target: Target, images: Any, top_k: int, model: str | None, version: str | None):
    return pb.ClassifyRequest(model=target.ref(model, version), images=to_images(images), top_k=top_k)


def embed_request(target: Target, images: Any, model: str | None, version: str | None):
    return pb.EmbedRequest(model=target.ref(model, version), images=to_images(images))


def info_request(target: Target, model: str | None, version: str | None):
    return pb.GetModelInfoRequest(model=target.ref(model, version))
