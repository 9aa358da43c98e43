"""grpc.health.v1 statuses, kept in step with the repository (names from docs/server-contract.md).

``""`` is liveness; ``tlserve.v1.Inference`` is SERVING while any model is ready;
``tlserve.model.<name>`` is SERVING while that model has a ready version.
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from tlserve.server.repository import ModelRepository

INFERENCE_SERVICE = "tlserve.v1.Inference"
MODEL_SERVICE_PREFIX = "tlserve.model."
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def model_service(name: str) -> str:
    return f"{MODEL_SERVICE_PREFIX}{name}"


class HealthReporter:
    """Owns the health servicer and derives every status from the repository."""

    def __init__(self) -> None:
        self.servicer = HealthServicer()
        self._extra: list[str] = []
        self._models: set[str] = set()

    def also_report(self, service: str) -> None:
        """Another API (e.g. OIP) whose status follows tlserve.v1.Inference."""
        self._extra.append(service)

    async def update(self, repository: ModelRepository) -> None:
        any_ready = False
        names = set(repository.names())
        for name in self._models - names:
            await self.servicer.set(model_service(name), NOT_SERVING)
        self._models |= names
        for name in sorted(names):
            ready = repository.is_ready(name)
            any_ready = any_ready or ready
            await self.servicer.set(model_service(name), SERVING if ready else NOT_SERVING)
        for service in [INFERENCE_SERVICE, *self._extra]:
            await self.servicer.set(service, SERVING if any_ready else NOT_SERVING)

    async def shutdown(self) -> None:
        """Every service NOT_SERVING, for good (graceful shutdown)."""
        await self.servicer.enter_graceful_shutdown()
