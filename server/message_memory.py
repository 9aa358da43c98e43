"""The message memory budget: what a request message grows into once parsed, reserved before it is parsed.

gRPC hands our parser a message's bytes (``tlserve.server.wire`` calls :meth:`MessageMemory.admit`
with their length); protobuf's parse and the servicer's copies then take up to ``GROWTH_COPIES`` more
bytes per message byte (``tlserve.server.budget``). So that much is reserved on one server-wide
:class:`~tlserve.server.admission.Budget` first, and a message that does not fit is refused
(RESOURCE_EXHAUSTED, retryable) unparsed. A unary request's reservation is the call's until it
ends: gRPC holds the request's bytes and parsed message until the response is sent, after the
handler returns. A stream's message keeps its reservation until the next message is parsed, or
the handler ends. An empty budget admits any message.

The parser, the interceptors and the handler of one call run in the call's own asyncio task (a
stream's reads may run in tasks it starts, which copy its context): :meth:`MessageMemory.open_call`
puts a slot for the reservation in a context variable there, and releases it when that task ends,
whichever way it ends (answered, refused by an outer interceptor, cancelled).
"""

from __future__ import annotations

import asyncio
import contextvars

from tlserve.server.admission import Budget, Reservation
from tlserve.server.budget import GROWTH_COPIES


class _Slot:
    """The reservation of the message one call is handling now."""

    __slots__ = ("reservation",)

    def __init__(self) -> None:
        self.reservation: Reservation | None = None

    def release(self, _task: object = None) -> None:
        if self.reservation is not None:
            self.reservation.release()
            self.reservation = None


class MessageMemory:
    """Reserves ``GROWTH_COPIES`` bytes per message byte on ``budget`` for the message a call handles."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._slot: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("tlserve_message_slot", default=None)

    def open_call(self) -> None:
        """In the call's task, before its handler runs: the slot its messages' reservations go in,
        released when the task ends."""
        slot = _Slot()
        self._slot.set(slot)
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(slot.release)

    def admit(self, size: int) -> str | None:
        """Reserve for a message of ``size`` bytes (the call's previous message's reservation is given
        back first); None when admitted, else the refusal's details."""
        slot = self._slot.get()
        if slot is None:  # not a call this guard opened
            return None
        slot.release()
        amount = size * GROWTH_COPIES
        slot.reservation = self.budget.admit(amount)
        return None if slot.reservation is not None else self.budget.busy(amount)

    def end(self) -> None:
        """The stream's handler is done with its messages: release the last one's reservation now."""
        slot = self._slot.get()
        if slot is not None:
            slot.release()
