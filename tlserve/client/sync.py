"""The blocking client: one channel per client, reused by every call, closed with the client."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import grpc

from tlserve.client.base import UNSET, ClientBase
from tlserve.client.channel import ChannelSecurity, RetryPolicy, open_channel
from tlserve.client.health import wait_ready
from tlserve.client.images import ImageLike
from tlserve.client.requests import classify_request, embed_request, info_request
from tlserve.client.results import Classification, Classified, Embedded
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb


class Client(ClientBase):
    """Classify and embed images on a tlserve server (``host:port``).

    ``security`` gives TLS, mTLS and the bearer token; ``retry`` is gRPC's retry policy for UNAVAILABLE and
    RESOURCE_EXHAUSTED; ``timeout`` is each call's deadline in seconds unless the call gives its own
    (``None``: no deadline); ``wait_for_ready`` makes calls wait (within their deadline) for a server that
    is not reachable yet instead of failing at once. ``model``/``version`` are the defaults of every call.
    Errors are :class:`grpc.RpcError` (``.code()``, ``.details()``). Use it as a context manager, or call
    :meth:`close`.
    """

    def _open(self, target: str, security: ChannelSecurity, retry: RetryPolicy, options: Sequence) -> grpc.Channel:
        return open_channel(target, security, retry, options)  # the token rides on the channel

    # --- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the task API --------------------------------------------------------------------------
    def classify(
        self,
        images: ImageLike | Sequence[ImageLike],
        top_k: int = 1,
        *,
        model: str | None = None,
        version: str | None = None,
        timeout: float | None = UNSET,
        wait_for_ready: bool | None = None,
    ) -> Classified:
        """The ``top_k`` most likely labels of each image (one image or a list; see tlserve.client.images)."""
        request = classify_request(self._defaults, images, top_k, model, version)
        return Classified.from_pb(self._stub.Classify(request, **self._call(timeout, wait_for_ready)))

    def embed(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        model: str | None = None,
        version: str | None = None,
        timeout: float | None = UNSET,
        wait_for_ready: bool | None = None,
    ) -> Embedded:
        """The embedding of each image, float32 [N, D]; FAILED_PRECONDITION for a model without one."""
        request = embed_request(self._defaults, images, model, version)
        return Embedded.from_pb(self._stub.Embed(request, **self._call(timeout, wait_for_ready)))

    def classify_many(
        self,
        images: Iterable[ImageLike],
        top_k: int = 1,
        batch_size: int = 32,
        window: int = 4,
        *,
        model: str | None = None,
        version: str | None = None,
        timeout: float | None = UNSET,
    ) -> Iterator[Classification]:
        """Classify a long sequence in requests of ``batch_size`` images, ``window`` requests in flight at
        once on the one channel; results in input order."""
        pending: deque = deque()
        batch: list[ImageLike] = []

        def send() -> None:
            request = classify_request(self._defaults, batch, top_k, model, version)
            pending.append(self._stub.Classify.future(request, **self._call(timeout, None)))

        for image in images:
            batch.append(image)
            if len(batch) == batch_size:
                send()
                batch = []
                if len(pending) >= window:
                    yield from Classified.from_pb(pending.popleft().result()).results
        if batch:
            send()
        while pending:
            yield from Classified.from_pb(pending.popleft().result()).results

    def model_info(
        self, model: str | None = None, version: str | None = None, *, timeout: float | None = UNSET
    ) -> pb.ModelInfo:
        return self._stub.GetModelInfo(info_request(self._defaults, model, version), **self._call(timeout, None))

    def list_models(self, *, timeout: float | None = UNSET) -> list[pb.ModelInfo]:
        return list(self._stub.ListModels(pb.ListModelsRequest(), **self._call(timeout, None)).models)

    def reload_repository(self, *, timeout: float | None = UNSET) -> pb.ReloadRepositoryResponse:
        """Rescan the server's model repository now (needs a token with the ``admin`` scope)."""
        return self._stub.ReloadRepository(pb.ReloadRepositoryRequest(), **self._call(timeout, None))

    # --- health --------------------------------------------------------------------------------
    def wait_ready(self, timeout: float, model: str | None = None) -> None:
        """Poll grpc.health.v1 until the server (or ``model``) reports SERVING; TimeoutError after ``timeout`` s."""
        wait_ready(self.channel, timeout, model)
