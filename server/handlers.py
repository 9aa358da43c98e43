"""Each method's wrapped handler, built once: what an interceptor that wraps handlers keeps between calls.

gRPC's ``intercept_service`` runs on every call, and wrapping a handler there costs new closures and
a new ``RpcMethodHandler`` each time; a :class:`WrappedHandlers` builds one per method and builds it
again only if gRPC hands over another handler for that method. Only registered methods reach it
(an unknown method's handler is None, which the interceptors pass through), so it holds at most one
entry per method the server has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import grpc

W = TypeVar("W")


class WrappedHandlers(Generic[W]):
    """``wrap(handler, method)``, cached per method."""

    def __init__(self, wrap: Callable[[grpc.RpcMethodHandler, str], W]) -> None:
        self._wrap = wrap
        self._by_method: dict[str, tuple[grpc.RpcMethodHandler, W]] = {}

    def get(self, handler: grpc.RpcMethodHandler, method: str) -> W:
        cached = self._by_method.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._by_method[method] = (handler, self._wrap(handler, method))
        return cached[1]
