"""WrappedHandlers: each method's wrapped handler is built once, and again only for another handler."""

from __future__ import annotations

import grpc

from tlserve.server.handlers import WrappedHandlers


async def behaviour(request: bytes, context: object) -> bytes:
    return request


def test_a_method_is_wrapped_once_and_again_only_for_a_new_handler():
    built: list[str] = []

    def wrap(handler: grpc.RpcMethodHandler, method: str) -> tuple[str, grpc.RpcMethodHandler]:
        built.append(method)
        return method, handler

    handlers = WrappedHandlers(wrap)
    first = grpc.unary_unary_rpc_method_handler(behaviour)
    other = grpc.unary_unary_rpc_method_handler(behaviour)
    assert handlers.get(first, "/s/A") is handlers.get(first, "/s/A")
    assert handlers.get(first, "/s/B") == ("/s/B", first)
    assert built == ["/s/A", "/s/B"]
    assert handlers.get(other, "/s/A") == ("/s/A", other)  # the server handed over another handler
    assert built == ["/s/A", "/s/B", "/s/A"]
