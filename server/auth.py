"""Who may call what: the method -> scope table and the one interceptor that enforces it.

Every call passes :class:`AuthInterceptor` before any servicer sees it; servicers know nothing of
tokens. A call needs ``authorization: Bearer <token>`` metadata whose token (see
:mod:`tlserve.server.tokens`) holds the method's scope:

- ``infer``: the task API but ``ReloadRepository``, and the Open Inference Protocol (inference,
  metadata, statistics, readiness);
- ``admin``: ``ReloadRepository``, and any method not in :data:`METHOD_SCOPES` (deny by default).

Scopes do not imply each other (as Triton's restricted protocols and TorchServe's separate keys):
an ``admin``-only token cannot infer; give a token ``infer,admin`` for both. ``grpc.health.v1.Health``
is open (kubelet probes send no token). Server reflection needs ``infer`` unless
``public_reflection`` opens it.

No or an unknown token: UNAUTHENTICATED; a token without the scope: PERMISSION_DENIED. The refusal
happens before any request message is deserialized, streams included, and is counted in
``tlserve_auth_refusals_total{rpc, reason}`` with reason ``missing``, ``invalid`` or ``scope``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter

from tlserve.server.tokens import TokenFile

log = logging.getLogger(__name__)

INFER = "infer"
ADMIN = "admin"
OPEN = ""  # no token needed

_TASK = "/tlserve.v1.Inference/"
_OIP = "/inference.GRPCInferenceService/"
# Exact "/package.Service/Method" paths, or "/package.Service/*" for a whole service.
METHOD_SCOPES: dict[str, str] = {
    **{_TASK + m: INFER for m in ("Classify", "ClassifyStream", "Embed", "GetModelInfo", "ListModels")},
    _TASK + "ReloadRepository": ADMIN,
    **{
        _OIP + m: INFER
        for m in (
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelInfer",
            "ModelStreamInfer",
            "ModelConfig",
            "ModelStatistics",
        )
    },
    "/grpc.health.v1.Health/*": OPEN,
    "/grpc.reflection.v1alpha.ServerReflection/*": INFER,
    "/grpc.reflection.v1.ServerReflection/*": INFER,
}
REFLECTION_SERVICES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")

MISSING = "missing bearer token in the 'authorization' metadata"
MALFORMED = "the 'authorization' metadata must be 'Bearer <token>'"
UNKNOWN = "the bearer token is not valid"


def required_scope(method: str, public_reflection: bool = False) -> str:
    """The scope ``method`` ("/package.Service/Method") needs: ``infer``, ``admin``, or OPEN ("")."""
    if public_reflection and method.startswith(REFLECTION_SERVICES):
        return OPEN
    if method in METHOD_SCOPES:
        return METHOD_SCOPES[method]
    return METHOD_SCOPES.get(method.rsplit("/", 1)[0] + "/*", ADMIN)


def bearer_token(metadata: Any) -> str | None:
    """The value of the first ``authorization`` metadata entry, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers ``code`` without reading a message."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Admits a call only with a bearer token holding the method's scope (see the module docstring)."""

    def __init__(self, tokens: TokenFile, refusals: Counter, public_reflection: bool = False) -> None:
        self._tokens = tokens
        self._refusals = refusals
        self._public_reflection = public_reflection

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        scope = required_scope(method, self._public_reflection)
        if handler is None or scope == OPEN:  # unknown methods: gRPC answers UNIMPLEMENTED
            return handler
        refusal = self._refusal(bearer_token(handler_call_details.invocation_metadata), scope, method)
        if refusal is None:
            return handler
        code, reason, message = refusal
        self._refusals.labels(rpc=method.rsplit("/", 1)[-1], reason=reason).inc()
        log.debug("refused %s: %s", method, reason)
        return _refusing(handler, code, message)

    def _refusal(self, header: str | None, scope: str, method: str) -> tuple[grpc.StatusCode, str, str] | None:
        if not header:
            return grpc.StatusCode.UNAUTHENTICATED, "missing", MISSING
        kind, _, token = header.strip().partition(" ")
        token = token.strip()
        if kind.lower() != "bearer" or not token:
            return grpc.StatusCode.UNAUTHENTICATED, "invalid", MALFORMED
        scopes = self._tokens.scopes(token)
        if scopes is None:
            return grpc.StatusCode.UNAUTHENTICATED, "invalid", UNKNOWN
        if scope not in scopes:
            return grpc.StatusCode.PERMISSION_DENIED, "scope", f"token lacks scope '{scope}' required by {method}"
        return None
