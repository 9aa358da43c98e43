"""The asyncio client: the same calls as :class:`tlserve.client.Client`, awaited. Create it inside the
running event loop (``async with AsyncClient(...) as client:``); images are read and encoded in a thread."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2

from tlserve.client.base import UNSET, ClientBase
from tlserve.client.channel import ChannelSecurity, RetryPolicy, open_aio_channel
from tlserve.client.health import POLL_SECONDS, SERVING, health_service
from tlserve.client.images import ImageLike
from tlserve.client.requests import classify_request, embed_request, info_request
from tlserve.client.results import Classified, Embedded
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb


class AsyncClient(ClientBase):
    """Classify and embed images on a tlserve server from asyncio; arguments as :class:`tlserve.client.Client`."""

    def _open(self, target: str, security: ChannelSecurity, retry: RetryPolicy, options: Sequence) -> grpc.aio.Channel:
        return open_aio_channel(target, security, retry, options)

    def _call_metadata(self, security: ChannelSecurity) -> tuple[tuple[str, str], ...]:
        return security.metadata  # an aio channel cannot add it: every call sends it

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def classify(
        self,
        images: ImageLike | Sequence[ImageLike],
        top_k: int = 1,
        *,
        model: str | None = None,
        version: str | None = None,
        timeout: float | None = UNSET,
        wait_for_ready: bool | None = None,
    ) -> Classified:
        request = await asyncio.to_thread(classify_request, self._defaults, images, top_k, model, version)
        return Classified.from_pb(await self._stub.Classify(request, **self._call(timeout, wait_for_ready)))

    async def embed(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        model: str | None = None,
        version: str | None = None,
        timeout: float | None = UNSET,
        wait_for_ready: bool | None = None,
    ) -> Embedded:
        request = await asyncio.to_thread(embed_request, self._defaults, images, model, version)
        return Embedded.from_pb(await self._stub.Embed(request, **self._call(timeout, wait_for_ready)))

    async def model_info(
        self, model: str | None = None, version: str | None = None, *, timeout: float | None = UNSET
    ) -> pb.ModelInfo:
        request = info_request(self._defaults, model, version)
        return await self._stub.GetModelInfo(request, **self._call(timeout, None))

    async def list_models(self, *, timeout: float | None = UNSET) -> list[pb.ModelInfo]:
        return list((await self._stub.ListModels(pb.ListModelsRequest(), **self._call(timeout, None))).models)

    async def reload_repository(self, *, timeout: float | None = UNSET) -> pb.ReloadRepositoryResponse:
        return await self._stub.ReloadRepository(pb.ReloadRepositoryRequest(), **self._call(timeout, None))

    async def wait_ready(self, timeout: float, model: str | None = None) -> None:
        """Poll grpc.health.v1 until the server (or ``model``) reports SERVING; TimeoutError after ``timeout`` s."""
        service = health_service(model)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        last = "no answer"
        while loop.time() < give_up:
            try:
                answer = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if answer.status == SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            await asyncio.sleep(POLL_SECONDS)
        raise TimeoutError(f"{service} not SERVING after {timeout:.0f}s (last: {last})")
