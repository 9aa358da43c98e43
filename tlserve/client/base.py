"""What the blocking and the asyncio client share: their options, their one channel, and the keyword
arguments each call gets (its deadline, wait-for-ready, and per-call metadata where the channel needs it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grpc_health.v1 import health_pb2_grpc

from tlserve.client.channel import ChannelSecurity, RetryPolicy
from tlserve.client.requests import DEFAULT_TIMEOUT, Target
from tlserve.server.pb.tlserve.v1 import tlserve_pb2_grpc

UNSET: Any = object()  # a call's ``timeout`` when it gives none (``None`` means no deadline)


class ClientBase:
    """A client's options and channel; subclasses say how the channel is opened (:meth:`_open`)."""

    def __init__(
        self,
        target: str,
        security: ChannelSecurity = ChannelSecurity(),
        retry: RetryPolicy = RetryPolicy(),
        timeout: float | None = DEFAULT_TIMEOUT,
        model: str = "",
        version: str = "",
        wait_for_ready: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self._defaults = Target(model, version)
        self._metadata = self._call_metadata(security)
        self.channel = self._open(target, security, retry, options)
        self._stub = tlserve_pb2_grpc.InferenceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def _open(self, target: str, security: ChannelSecurity, retry: RetryPolicy, options: Sequence) -> Any:
        raise NotImplementedError

    def _call_metadata(self, security: ChannelSecurity) -> tuple[tuple[str, str], ...]:
        """Metadata sent with each call: none where the channel itself sends the token."""
        return ()

    def _call(self, timeout: float | None, wait_for_ready: bool | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "timeout": self.timeout if timeout is UNSET else timeout,
            "wait_for_ready": self.wait_for_ready if wait_for_ready is None else wait_for_ready,
        }
        if self._metadata:
            kwargs["metadata"] = self._metadata
        return kwargs
