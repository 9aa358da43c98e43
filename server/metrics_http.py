"""The Prometheus ``/metrics`` endpoint: a small HTTP/1.1 server on the serving event loop.

Unlike ``prometheus_client.start_http_server`` (a thread per connection, held for as long as the
peer keeps it open), connections here cost no thread: each must send its request head within
``read_timeout`` seconds (TLS handshake included) or is closed, at most ``max_connections`` are
open at once (more are closed on accept), and the exposition text is rendered on one worker thread.
So a slowloris peer can neither grow the thread count nor starve a scrape. One request per
connection (``Connection: close``), as Prometheus scrapes. HTTPS when given an ``ssl.SSLContext``.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import ssl
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

READ_TIMEOUT = 5.0
MAX_CONNECTIONS = 64
MAX_HEAD_BYTES = 16 * 1024
PATHS = ("/metrics", "/")


class MetricsServer:
    """``await start()`` binds (``port`` is then the bound one), ``await stop()`` closes."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._registry = registry
        self._host = host
        self.port = port
        self._ssl = ssl_context
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._open: set[asyncio.StreamWriter] = set()
        self._render = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        self._server: asyncio.Server | None = None

    @property
    def scheme(self) -> str:
        return "https" if self._ssl else "http"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve,
            self._host,
            self.port,
            ssl=self._ssl,
            ssl_handshake_timeout=self._read_timeout if self._ssl else None,
            limit=MAX_HEAD_BYTES,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._open):
                writer.transport.abort()
            await self._server.wait_closed()
        self._render.shutdown(wait=False)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= self._max_connections:
            writer.transport.abort()
            return
        self._open.add(writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._read_timeout)
            status, headers, body = await self._answer(head)
            writer.write(_response(status, headers, body))
            await asyncio.wait_for(writer.drain(), self._read_timeout)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except ssl.SSLError as exc:
            log.debug("metrics TLS error: %s", exc)
        finally:
            self._open.discard(writer)
            writer.close()

    async def _answer(self, head: bytes) -> tuple[str, dict[str, str], bytes]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return "400 Bad Request", {}, b"bad request\n"
        method, target, _ = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", {"Allow": "GET, HEAD"}, b"method not allowed\n"
        if target.split("?", 1)[0] not in PATHS:
            return "404 Not Found", {}, b"not found; try /metrics\n"
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = await asyncio.get_running_loop().run_in_executor(self._render, encoder, self._registry)
        extra = {"Content-Type": content_type}
        if "gzip" in headers.get("accept-encoding", ""):
            body = gzip.compress(body)
            extra["Content-Encoding"] = "gzip"
        if method == "HEAD":
            extra["Content-Length"], body = str(len(body)), b""
        return "200 OK", extra, body


def _response(status: str, headers: dict[str, str], body: bytes) -> bytes:
    fields = {"Content-Type": "text/plain; charset=utf-8", "Content-Length": str(len(body)), **headers}
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in fields.items()), "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body
