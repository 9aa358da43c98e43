"""The gRPC server's channel arguments: message sizes, streams per connection, keepalive enforcement
and connection age, each from its setting (the cap on concurrent calls is ``maximum_concurrent_rpcs``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tlserve.server.settings import Settings


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments for ``grpc.aio.server(options=...)``."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # keepalive enforcement: pings closer than this without data are strikes; too many -> GOAWAY
        ("grpc.http2.min_ping_interval_without_data_ms", settings.keepalive_min_ping_interval_ms),
        ("grpc.keepalive_permit_without_calls", int(settings.keepalive_permit_without_calls)),
        ("grpc.http2.max_ping_strikes", settings.keepalive_max_ping_strikes),
    ]
    if settings.max_connection_age_ms:  # gRPC adds +-10% jitter, so connections do not all end together
        options += [
            ("grpc.max_connection_age_ms", settings.max_connection_age_ms),
            ("grpc.max_connection_age_grace_ms", settings.max_connection_age_grace_ms),
        ]
    return options
