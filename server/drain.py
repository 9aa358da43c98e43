"""The drain gate: one server interceptor that counts the calls in flight and, once the drain begins,
refuses new ones with UNAVAILABLE and ends open streams after the message they are answering.

It exists because ``grpc.aio.Server.stop()`` cancels calls that were received but not yet handed to
a handler, and calls that reach it after it began (grpc/grpc#41785: the caller sees CANCELLED).
So shutdown goes: refuse here and wait until the calls in flight are done (:meth:`DrainGate.wait_idle`);
then *hold* each new call in its handler until no new one has come for a moment
(:meth:`DrainGate.hold_new_calls`): every caller now waits on a call we hold, none is on the wire;
then ``stop()`` begins, and the held calls are refused (:meth:`DrainGate.release`) once it has
(their callers' retries then find the port closed: UNAVAILABLE). Nothing is left to be cancelled.
Health and reflection pass through untouched (health answers NOT_SERVING during the drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from tlserve.server.handlers import WrappedHandlers
from tlserve.server.lifecycle import Lifecycle
from tlserve.server.rpc import RpcObserver

SHUTTING_DOWN = "shutting down; retry another replica"
UNGATED = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class DrainGate(grpc.aio.ServerInterceptor):
    """Counts gated calls while they run; refuses new ones once ``lifecycle.draining`` is set."""

    def __init__(self, lifecycle: Lifecycle, observer: RpcObserver) -> None:
        self._lifecycle = lifecycle
        self._observer = observer
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._holding = False
        self._released = asyncio.Event()
        self._held_calls = 0
        self._last_arrival = 0.0
        self._handlers = WrappedHandlers(lambda handler, method: self._gated(handler, method.rsplit("/", 1)[-1]))

    @property
    def active(self) -> int:
        """Gated calls (and open streams) being handled now."""
        return self._active

    async def wait_idle(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until no gated call is in flight; whether that happened."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(timeout, 0.0))
        except asyncio.TimeoutError:
            return self._active == 0
        return True

    async def hold_new_calls(self, quiet: float, limit: float) -> int:
        """From now on hold new calls (until :meth:`release`); return once none has arrived for ``quiet``
        seconds, or after ``limit`` seconds; the number held so far."""
        loop = asyncio.get_running_loop()
        self._holding = True
        self._last_arrival = started = loop.time()
        while (now := loop.time()) - self._last_arrival < quiet and now - started < limit:
            await asyncio.sleep(min(quiet - (now - self._last_arrival), limit - (now - started)))
        return self._held_calls

    def release(self) -> None:
        """Refuse the held calls (UNAVAILABLE), and every later one at once."""
        self._holding = False
        self._released.set()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(UNGATED):
            return handler
        return self._handlers.get(handler, method)

    # --- counting and refusing ----------------------------------------------------------------
    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def _refuse(self, context: grpc.aio.ServicerContext, rpc: str) -> None:
        if self._holding:
            self._held_calls += 1
            self._last_arrival = asyncio.get_running_loop().time()
            await self._released.wait()
        self._observer.refused(context, rpc, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    def _gated(self, handler: grpc.RpcMethodHandler, rpc: str) -> grpc.RpcMethodHandler:
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, rpc), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, rpc), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, rpc, ends_early=False),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(handler.stream_stream, rpc, ends_early=True),
            handler.request_deserializer,
            handler.response_serializer,
        )

    def _unary(self, behavior: Callable[..., Any], rpc: str) -> Callable[..., Any]:
        async def gated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not self._lifecycle.accepting:
                await self._refuse(context, rpc)
            with self._held():
                return await behavior(request, context)

        return gated

    def _streaming(self, behavior: Callable[..., Any], rpc: str, ends_early: bool) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):  # a handler that writes with context.write()
            return self._unary(behavior, rpc)

        async def gated(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if not self._lifecycle.accepting:
                await self._refuse(context, rpc)
            with self._held():
                async for response in behavior(self._until_draining(request) if ends_early else request, context):
                    yield response

        return gated

    async def _until_draining(self, requests: Any) -> AsyncIterator[Any]:
        """The stream's messages until the drain begins: the one being answered finishes, then the
        server ends its side (status OK) without reading more."""
        iterator = requests.__aiter__()
        draining = self._lifecycle.draining
        stop = asyncio.ensure_future(draining.wait())
        read: asyncio.Future[Any] | None = None
        try:
            while not draining.is_set():
                read = asyncio.ensure_future(iterator.__anext__())
                await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await read
                    return
                try:
                    message = read.result()
                except StopAsyncIteration:
                    return
                yield message
        finally:
            stop.cancel()
            if read is not None:  # closed while a read was pending (the handler ended): retrieve its outcome
                read.cancel()
                read.add_done_callback(lambda f: f.cancelled() or f.exception())
