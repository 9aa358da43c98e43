"""A budget a request reserves before its work starts: a full budget refuses at once, it never queues.

One ``Budget`` is shared by every request of the server (the decode memory budget, and the message
memory budget of ``tlserve.server.message_memory``); it is reserved and released on the event loop and
on decoding threads (a lone small image is admitted where it is decoded), under a lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from prometheus_client import Counter, Gauge

from tlserve.server.errors import InvalidArgument, ResourceExhausted

MB = 1_000_000


class Budget:
    """``capacity`` bytes shared by concurrent requests, with what is in use as a gauge and the refusals counted."""

    def __init__(self, what: str, capacity: int, in_use: Gauge | None = None, rejections: Counter | None = None):
        self.what = what
        self.capacity = capacity
        self.in_use = 0
        self._gauge = in_use
        self._rejections = rejections
        self._lock = threading.Lock()

    def take(self, amount: int) -> Reservation:
        """Reserve ``amount`` bytes until the returned reservation is released. More than the whole
        budget is the request's fault (InvalidArgument); more than what is free now is the server's
        load (ResourceExhausted: retry later)."""
        if amount > self.capacity:
            raise InvalidArgument(
                f"the request needs {amount / MB:.0f} MB for {self.what} at once, more than the server's "
                f"budget of {self.capacity / MB:.0f} MB; send fewer or smaller images per request"
            )
        reservation = self._try(amount, empty_admits_any=False)
        if reservation is None:
            raise ResourceExhausted(self.busy(amount))
        return reservation

    def admit(self, amount: int) -> Reservation | None:
        """:meth:`take` for memory already on its way in: None (the refusal counted) when ``amount`` does
        not fit in what is free now; never refused for its size alone, since an empty budget admits any
        amount (so one request of any size the server accepts gets through)."""
        return self._try(amount, empty_admits_any=True)

    def busy(self, amount: int) -> str:
        """Why a request of ``amount`` bytes is refused now, for the caller: the budget is full, retry."""
        return (
            f"server busy: the {self.what} budget is full ({self.in_use / MB:.0f} of {self.capacity / MB:.0f} "
            f"MB in use, this request needs {amount / MB:.0f} MB); retry later"
        )

    def _try(self, amount: int, *, empty_admits_any: bool) -> Reservation | None:
        """Reserve ``amount`` if it fits in what is free (or, with ``empty_admits_any``, if nothing is in
        use or nothing is asked); else count the refusal and return None."""
        with self._lock:
            if self.in_use + amount <= self.capacity or (empty_admits_any and not (self.in_use and amount)):
                self._add(amount)
                return Reservation(self, amount)
        if self._rejections is not None:
            self._rejections.inc()
        return None

    @contextlib.contextmanager
    def reserve(self, amount: int) -> Iterator[None]:
        """:meth:`take` for the ``with`` block."""
        reservation = self.take(amount)
        try:
            yield
        finally:
            reservation.release()

    def _add(self, amount: int) -> None:
        """Called with the lock held (take) or taking it (a reservation's release)."""
        self.in_use += amount
        if self._gauge is not None:
            self._gauge.set(self.in_use)

    def _give_back(self, amount: int) -> None:
        with self._lock:
            self._add(-amount)


class Reservation:
    """Bytes held on a budget; ``release()`` gives them back (once, however often it is called)."""

    def __init__(self, budget: Budget, amount: int) -> None:
        self._budget = budget
        self.amount = amount

    def release(self) -> None:
        if self.amount:
            self._budget._give_back(self.amount)
            self.amount = 0
