"""One log line per finished call (``--log-requests``: failed calls, all, or none), on the
``tlserve.server.requests`` logger: request id, trace id, model, version, code and duration.

The fields travel as the record's ``json_fields`` (``--log-format json`` writes them as keys) and
also as ``key=value`` text in the message. The request id is the caller's ``x-request-id``
metadata (cut to 64 characters) or, without one, 16 random hex digits.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from tlserve.server.rpc import RpcCall

log = logging.getLogger("tlserve.server.requests")
REQUEST_ID_KEY = "x-request-id"
REQUEST_ID_LIMIT = 64
POLICIES = ("none", "failed", "all")


def request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and value:
            return value[:REQUEST_ID_LIMIT]
    return os.urandom(8).hex()


class RequestLog:
    """Writes the line of each call the policy asks for (``failed``: every code but OK)."""

    def __init__(self, policy: str = "failed") -> None:
        if policy not in POLICIES:
            raise ValueError(f"request log policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        self.failed = policy != "none"  # failed calls are logged
        self.all = policy == "all"  # so are the others

    def wants(self, code: grpc.StatusCode) -> bool:
        return self.all or (self.failed and code is not grpc.StatusCode.OK)

    def write(self, context: grpc.aio.ServicerContext, rpc: str, call: RpcCall, trace_id: str) -> None:
        fields: dict[str, object] = {
            "rpc": rpc,
            "code": call.code.name,
            "duration_ms": round((time.monotonic() - call.started) * 1000, 3),
            "model": call.model,
            "version": call.version,
            "request_id": request_id(context),
            "trace_id": trace_id,
        }
        if call.error is not None:
            fields["error"] = call.error  # the caller-safe status message, never a traceback
        shown = {key: value for key, value in fields.items() if value != ""}
        text = " ".join(f"{key}={value!r}" if key == "error" else f"{key}={value}" for key, value in shown.items())
        log.log(logging.INFO, "%s", text, extra={"json_fields": fields})
