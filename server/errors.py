"""One exception hierarchy for serving; each class carries the gRPC status a caller receives.

Servicers never build status codes by hand: they let these exceptions propagate and
:func:`to_status` (through :meth:`tlserve.server.rpc.RpcObserver.observe`) turns them into a status and a
message. Anything that is not a :class:`ServingError` is logged with its traceback and answered
``INTERNAL`` with a generic message, so a caller never sees a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error"
QUOTE_LIMIT = 100  # characters of a caller's string a status message may repeat


def quote(text: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(text)`` for a status message, cut to about ``limit`` characters: a longer string keeps
    its first ``limit`` characters, then an ellipsis and its original length, so an error describes
    what the caller sent without echoing it (a 1 MB model name must not become a 1 MB status). The
    cut applies to the repr too: escapes (``\\U000d78ed`` is ten characters) cannot stretch it."""
    text = str(text)
    shown = repr(text[:limit])
    if len(shown) > limit + 2:
        shown = shown[: limit + 1] + shown[0]
    elif len(text) <= limit:
        return shown
    return f"{shown}... ({len(text)} characters)"


class ServingError(Exception):
    """Base class: an error whose message is safe to show to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServingError):
    """The request itself is wrong: a corrupt image, a bad tensor shape, too many images."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    """No such model or version."""

    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServingError):
    """A bounded queue or size limit is full; retry later or send less."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServingError):
    """The model exists but is not ready (loading, draining, shutting down)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServingError):
    """The caller's deadline passed before the work could be done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(ServingError):
    """The system is not in a state to do this (e.g. the model lacks the requested output)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and caller-safe message for ``exc``; unknown exceptions are logged with traceback."""
    if isinstance(exc, ServingError):
        return exc.code, str(exc) or exc.code.name.lower()
    log.error("unhandled error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def shape_text(shape: Sequence[int], show: int = 6) -> str:
    """A caller's tensor shape for a message, short however many dimensions it has."""
    dims = [int(d) for d in shape]
    if len(dims) <= show:
        return str(dims)
    return f"[{', '.join(map(str, dims[:show]))}, ...] ({len(dims)} dimensions)"


def count_text(count: int) -> str:
    """An element or byte count for a message; one past 64 bits is given as a power of two."""
    return str(count) if count < 2**64 else f"over 2^{count.bit_length() - 1}"
