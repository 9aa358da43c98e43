"""The wire guard: a bound on what protobuf builds from a request before any handler of ours runs.

gRPC hands each request's bytes to the message's parser on the event loop, and the parser allocates
about 90 bytes for every embedded message, so 4 MiB of empty ``inputs`` entries (two bytes each)
become 170 MiB of objects. Before parsing a message too big to be harmless, the guard walks its wire
format (the field tags, not the payloads: a tensor's bytes are skipped in one step) and counts its
fields, nested messages' included. Past ``limit`` the call is refused with INVALID_ARGUMENT and the
bytes are never parsed; so is a message whose packed values would grow more than 4x once parsed
(int64 contents of values under 128 grow 8x, 15x with the arena's copies), and one that is not valid
wire format. The walk itself stops at the limit, so it costs the event loop little either way.
A unary call is answered with the status; a stream answers the messages before the bad one and
then ends with it. A message the message memory budget has no room for is refused the same way
with RESOURCE_EXHAUSTED, before it is parsed (``tlserve.server.message_memory``). The cost on a
normal request is a length check and the reservation, or a few field tags for a large one.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from tlserve.server.drain import UNGATED
from tlserve.server.handlers import WrappedHandlers
from tlserve.server.message_memory import MessageMemory
from tlserve.server.rpc import RpcObserver, answer

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
# bytes each value of a packed varint field takes once parsed
PACKED_WIDTH = {
    FieldDescriptor.TYPE_INT64: 8,
    FieldDescriptor.TYPE_UINT64: 8,
    FieldDescriptor.TYPE_SINT64: 8,
    FieldDescriptor.TYPE_INT32: 4,
    FieldDescriptor.TYPE_UINT32: 4,
    FieldDescriptor.TYPE_SINT32: 4,
    FieldDescriptor.TYPE_ENUM: 4,
    FieldDescriptor.TYPE_BOOL: 1,
}
# packed values may grow to this many times their wire bytes: what 32-bit values ever take (4 bytes
# for one); 64-bit values under 128 (8 bytes for one) are refused
MAX_PACKED_GROWTH = 4


class Rejected:
    """What the guarded parser returns instead of a message: the status and reason, for the handler to answer."""

    def __init__(self, details: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        self.details = details
        self.code = code


class Malformed(ValueError):
    """The bytes are not wire format this guard accepts (truncated, or a deprecated group)."""


class TooMany(ValueError):
    """More fields than the limit."""


class TooLarge(ValueError):
    """Packed values that would grow past MAX_PACKED_GROWTH times the message."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise Malformed("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


@dataclass(frozen=True)
class _Fields:
    """One message type's fields, by number: the nested message types and the packed varint widths."""

    messages: dict[int, Descriptor]
    packed: dict[int, int]


class FieldCounter:
    """Counts the fields in a message's wire format, nested messages' included, stopping at the first
    past the limit; and sums what its packed varint values take once parsed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._types: dict[str, _Fields] = {}

    def _fields(self, descriptor: Descriptor) -> _Fields:
        fields = self._types.get(descriptor.full_name)
        if fields is None:
            fields = _Fields(
                {f.number: f.message_type for f in descriptor.fields if f.type == FieldDescriptor.TYPE_MESSAGE},
                {f.number: PACKED_WIDTH[f.type] for f in descriptor.fields if f.is_repeated and f.type in PACKED_WIDTH},
            )
            self._types[descriptor.full_name] = fields
        return fields

    def needs_walk(self, size: int) -> bool:
        """Each field takes at least two bytes (tag, value): a smaller message cannot exceed the limit, and
        its packed values cannot grow past a few hundred kilobytes."""
        return size > 2 * self.limit

    def count(self, data: bytes, descriptor: Descriptor) -> int:
        """Fields in ``data``; raises TooMany past the limit, TooLarge for packed values that would grow
        past MAX_PACKED_GROWTH times ``data``, and Malformed on bad wire format."""
        count = grown = 0
        pending = [(descriptor, 0, len(data))]
        while pending:
            message, pos, end = pending.pop()
            fields = self._fields(message)
            while pos < end:
                count += 1
                if count > self.limit:
                    raise TooMany(count)
                key, pos = _varint(data, pos)
                wire = key & 7
                if wire == VARINT:
                    _, pos = _varint(data, pos)
                elif wire == FIXED64:
                    pos += 8
                elif wire == FIXED32:
                    pos += 4
                elif wire == LENGTH:
                    length, pos = _varint(data, pos)
                    if pos + length > end:
                        raise Malformed("a field runs past the end of its message")
                    number = key >> 3
                    if number in fields.messages:
                        pending.append((fields.messages[number], pos, pos + length))
                    elif number in fields.packed and length:
                        values = length - _continuation_bytes(data, pos, length)
                        grown += values * fields.packed[number]
                    pos += length
                else:
                    raise Malformed(f"wire type {wire} (groups are not proto3)")
            if pos > end:
                raise Malformed("a field runs past the end of its message")
        if grown > MAX_PACKED_GROWTH * len(data):
            raise TooLarge(grown)
        return count


def _continuation_bytes(data: bytes, pos: int, length: int) -> int:
    """Bytes with the high bit set in ``data[pos:pos+length]``: every varint value ends at one without it."""
    return int(np.count_nonzero(np.frombuffer(data, np.uint8, length, pos) >= 0x80))


def _admitted(size: int) -> None:
    return None


class WireGuard(grpc.aio.ServerInterceptor):
    """Wraps every method's request parser with the count and the message memory reservation, and its
    handler with the refusal and the reservation's release. Each method's wrapped handler is built once."""

    def __init__(self, limit: int, observer: RpcObserver, memory: MessageMemory) -> None:
        self._counter = FieldCounter(limit)
        self._observer = observer
        self._memory = memory
        self._handlers = WrappedHandlers(self._guarded)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        guarded = self._handlers.get(handler, method)
        if guarded is None:
            return handler
        if not method.startswith(UNGATED):  # health checks and reflection are never charged
            self._memory.open_call()
        return guarded

    def _guarded(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler | None:
        parse = getattr(handler, "request_deserializer", None)
        descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)  # Message.FromString's class
        if parse is None or not isinstance(descriptor, Descriptor):
            return None
        rpc = method.rsplit("/", 1)[-1]
        guarded = self._guarded_parser(parse, descriptor, reserve=not method.startswith(UNGATED))
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, rpc), guarded, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(handler.unary_stream, rpc), guarded, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._streamed(handler.stream_unary, rpc), guarded, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streamed(handler.stream_stream, rpc), guarded, handler.response_serializer
        )

    def _guarded_parser(
        self, parse: Callable[[bytes], Any], descriptor: Descriptor, reserve: bool
    ) -> Callable[[bytes], Any]:
        """``reserve``: on the message memory budget (not for health checks and reflection: a full budget
        must not fail a probe, and their requests are a few bytes)."""
        counter = self._counter
        admit = self._memory.admit if reserve else _admitted

        def guarded(data: bytes) -> Any:
            if counter.needs_walk(len(data)):
                try:
                    counter.count(data, descriptor)
                except TooMany:
                    return Rejected(
                        f"the request has more than {counter.limit} fields (inputs, outputs, parameters, images, "
                        "repeated values); send fewer per call, or raise --max-request-fields"
                    )
                except TooLarge as exc:
                    return Rejected(
                        f"the request's packed values would take {exc.args[0]} bytes once parsed, more than "
                        f"{MAX_PACKED_GROWTH}x its {len(data)} bytes (64-bit values under 128: int64 contents or "
                        "shapes); send raw_input_contents or the model's own datatype"
                    )
                except Malformed as exc:
                    return Rejected(f"the request is not a valid {descriptor.full_name} message: {exc}")
            busy = admit(len(data))
            if busy is not None:
                return Rejected(busy, grpc.StatusCode.RESOURCE_EXHAUSTED)
            try:
                return parse(data)
            except DecodeError as exc:
                return Rejected(f"the request is not a valid {descriptor.full_name} message: {exc}")

        return guarded

    async def _refuse(self, context: grpc.aio.ServicerContext, rpc: str, rejected: Rejected) -> None:
        """Counted, logged and traced; RESOURCE_EXHAUSTED goes out trailers-only, so a retry policy retries it."""
        self._observer.refused(context, rpc, rejected.code, rejected.details)
        await answer(context, rejected.code, rejected.details)

    # A unary request's reservation is released when its call's task ends (MessageMemory.open_call): gRPC
    # holds the request's bytes and parsed message until it has sent the response, after the handler.
    def _unary(self, behavior: Callable[..., Any], rpc: str) -> Callable[..., Any]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Rejected):
                return await self._refuse(context, rpc, request)
            return await behavior(request, context)

        return unary

    def _unary_stream(self, behavior: Callable[..., Any], rpc: str) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):  # a handler that writes with context.write()
            return self._unary(behavior, rpc)

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Rejected):
                await self._refuse(context, rpc, request)
                return
            async for response in behavior(request, context):
                yield response

        return unary_stream

    def _streamed(self, behavior: Callable[..., Any], rpc: str) -> Callable[..., Any]:
        """A request stream ends at its first rejected message, which sets the status the call ends with.
        Each message's reservation is given back when the next one is parsed, the last one's when the
        handler ends."""
        end = self._memory.end

        async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Rejected):
                    await self._refuse(context, rpc, request)
                    return
                yield request

        if inspect.isasyncgenfunction(behavior):

            async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for response in behavior(checked(requests, context), context):
                        yield response
                finally:
                    end()

            return stream

        async def unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(checked(requests, context), context)
            finally:
                end()

        return unary
