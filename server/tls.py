"""Server TLS from PEM files that may be replaced while serving (a rotated Kubernetes Secret).

:class:`CertificateFiles` holds the current certificate chain, key and optional client CA, checks
the files at most once per ``check_interval`` and adopts a new set only once it is consistent (the
key matches the certificate), so a half-written rotation keeps the old certificate in use.
:func:`server_credentials` hands it to gRPC as dynamic credentials: the fetcher runs before each
TLS handshake, so a new connection gets the new certificate and an open one keeps its own.
:func:`metrics_ssl_context` does the same for the HTTPS metrics port.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0  # seconds between looks at the files


class TLSConfigError(ValueError):
    """The certificate, key or client CA cannot be used; the message names the file, not its content."""


@dataclass(frozen=True)
class KeyMaterial:
    """One consistent set of PEM bytes; ``client_ca`` is None without mTLS."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def _no_password() -> bytes:
    raise TLSConfigError("encrypted private keys are not supported")


class CertificateFiles:
    """The PEM files of ``--tls-cert``, ``--tls-key`` and ``--tls-client-ca``, re-read when they change."""

    def __init__(
        self,
        cert: str,
        key: str,
        client_ca: str = "",
        check_interval: float = CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not cert or not key:
            raise TLSConfigError("TLS needs both --tls-cert and --tls-key")
        self.paths = tuple(Path(p) for p in (cert, key, client_ca) if p)
        self.mutual = bool(client_ca)
        self._check_interval = check_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._rejected: tuple | None = None  # files looked at and found unusable: not retried until they change
        self.current = self._load()  # raises TLSConfigError: refuse to start
        self.generation = 0
        self._next_check = clock() + check_interval

    def _stat(self) -> tuple:
        """What changes when a file is rewritten or its Secret symlink is swapped."""
        signature: list[tuple[int, ...] | None] = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError:
                signature.append(None)
                continue
            signature.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(signature)

    def _load(self) -> KeyMaterial:
        cert_path, key_path = self.paths[0], self.paths[1]
        try:
            material = KeyMaterial(
                cert_path.read_bytes(), key_path.read_bytes(), self.paths[2].read_bytes() if self.mutual else None
            )
        except OSError as exc:
            raise TLSConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert_path, key_path, password=_no_password)
        except TLSConfigError:
            raise TLSConfigError(f"{key_path} is an encrypted private key: give it unencrypted") from None
        except OSError as exc:  # ssl.SSLError included
            raise TLSConfigError(
                f"{cert_path} and {key_path} are not a PEM certificate chain and its key ({exc.__class__.__name__})"
            ) from None
        if self.mutual:
            try:
                context.load_verify_locations(cadata=material.client_ca.decode("ascii"))  # type: ignore[union-attr]
            except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
                raise TLSConfigError(f"{self.paths[2]} is not a PEM CA bundle ({exc.__class__.__name__})") from None
        # files rewritten while we read them: try again at the next look
        if (cert_path.read_bytes(), key_path.read_bytes()) != (material.cert, material.key):
            raise TLSConfigError(f"{cert_path} changed while being read")
        return material

    def refresh(self) -> int:
        """Look at the files if ``check_interval`` has passed; returns the generation (+1 per adopted change)."""
        now = self._clock()
        if now < self._next_check or not self._lock.acquire(blocking=False):
            return self.generation
        try:
            self._next_check = now + self._check_interval
            signature = self._stat()
            if signature not in (self._signature, self._rejected):
                try:
                    self.current = self._load()
                except TLSConfigError as exc:
                    self._rejected = signature
                    log.warning("TLS files changed but cannot be used yet, keeping the previous ones: %s", exc)
                else:
                    self._signature = signature
                    self.generation += 1
                    log.info("TLS certificate reloaded from %s", self.paths[0])
            return self.generation
        finally:
            self._lock.release()


def _configuration(material: KeyMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(material.key, material.cert)], material.client_ca)


def server_credentials(files: CertificateFiles) -> grpc.ServerCredentials:
    """TLS (mTLS when a client CA is given: a client certificate it signed is required) that follows the files."""
    seen = [files.generation]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            generation = files.refresh()
        except Exception:  # never let a bad look at the files break a handshake
            log.exception("TLS reload check failed")
            return None
        if generation == seen[0]:
            return None
        seen[0] = generation
        return _configuration(files.current)

    return grpc.dynamic_ssl_server_credentials(
        _configuration(files.current), fetch, require_client_authentication=files.mutual
    )


def metrics_ssl_context(files: CertificateFiles) -> ssl.SSLContext:
    """A server context for HTTPS that switches to the newest certificate at each handshake.

    Client certificates are not asked for: the metrics port is scraped by Prometheus.
    """
    built: dict[int, ssl.SSLContext] = {}

    def context_for(generation: int) -> ssl.SSLContext:
        if generation not in built:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(files.paths[0], files.paths[1], password=_no_password)
            built.clear()
            built[generation] = context
        return built[generation]

    base = context_for(files.generation)

    def on_hello(connection: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext) -> None:
        try:
            connection.context = context_for(files.refresh())
        except (ssl.SSLError, OSError, TLSConfigError):
            log.warning("metrics TLS: keeping the previous certificate (files are being replaced)")
            connection.context = base if not built else next(iter(built.values()))

    base.sni_callback = on_hello
    return base
