"""Bind the gRPC port, alone (the server is built with ``grpc.so_reuseport`` off), and say why when it cannot.

With SO_REUSEPORT on (gRPC's default) a second server on a taken port starts anyway and the kernel
splits the connections between the two; with it off, binding fails and ``tlserve serve`` exits 2.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

GRPC_OPTIONS = [("grpc.so_reuseport", 0)]


class PortInUse(OSError):
    """The gRPC address could not be bound (its message says why)."""


def _in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails with EADDRINUSE right now (as gRPC binds: SO_REUSEADDR on)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def bind_port(add_port: Callable[[str], int], host: str, port: int) -> int:
    """``add_port(address)`` (e.g. ``server.add_insecure_port``); the bound port, or :class:`PortInUse`."""
    address = f"{host}:{port}"
    try:
        bound = add_port(address)
    except RuntimeError:  # grpcio raises "Failed to bind to address ..."
        bound = 0
    if bound:
        return bound
    if port and _in_use(host, port):
        raise PortInUse(f"port {port} is already in use (gRPC address {address})")
    raise PortInUse(f"cannot bind the gRPC address {address}")
