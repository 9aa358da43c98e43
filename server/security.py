"""Transport and call security as the settings ask: TLS/mTLS credentials, token auth, HTTPS metrics.

Nothing configured: plaintext and no auth (the pre-security behaviour). ``--tls-cert``/``--tls-key``
turn on TLS, ``--tls-client-ca`` mTLS, ``--token-file`` bearer-token auth (:mod:`tlserve.server.auth`).
Bad files raise one of :data:`CONFIG_ERRORS` while the server is built, so it refuses to start.
"""

from __future__ import annotations

import logging
import ssl

import grpc

from tlserve.server.auth import AuthInterceptor
from tlserve.server.metrics import Metrics
from tlserve.server.settings import Settings
from tlserve.server.tls import CertificateFiles, TLSConfigError, metrics_ssl_context, server_credentials
from tlserve.server.tokens import TokenFile, TokenFileError

log = logging.getLogger(__name__)

CONFIG_ERRORS = (TLSConfigError, TokenFileError)


class Security:
    """The certificate files and token file of one server, loaded (and checked) once at build time."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        wants_tls = bool(settings.tls_cert or settings.tls_key or settings.tls_client_ca)
        self.certificates = (
            CertificateFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca) if wants_tls else None
        )
        if settings.metrics_tls and self.certificates is None:
            raise TLSConfigError("--metrics-tls needs --tls-cert and --tls-key")
        self.tokens = TokenFile(settings.token_file) if settings.token_file else None
        if self.tokens is not None and self.certificates is None:
            log.warning("token auth without TLS: bearer tokens cross the network in plaintext")

    def interceptors(self, metrics: Metrics) -> list[grpc.aio.ServerInterceptor]:
        if self.tokens is None:
            return []
        return [AuthInterceptor(self.tokens, metrics.auth_refusals, self._settings.public_reflection)]

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Bind ``address`` with TLS when configured, else plaintext; returns the bound port."""
        if self.certificates is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, server_credentials(self.certificates))

    def metrics_ssl(self) -> ssl.SSLContext | None:
        if not self._settings.metrics_tls or self.certificates is None:
            return None
        return metrics_ssl_context(self.certificates)

    @property
    def summary(self) -> str:
        transport = "plaintext" if self.certificates is None else ("mTLS" if self.certificates.mutual else "TLS")
        return f"{transport}, token auth {'on' if self.tokens else 'off'}"
