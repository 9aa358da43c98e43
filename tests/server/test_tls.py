"""Transport security through the real server on port 0: TLS, mTLS, certificates rotated while
serving (new connections see the new certificate, open ones keep working), HTTPS metrics, the
plaintext health-only port for probes, a metrics endpoint that slowloris cannot exhaust, and
unmodified tritonclient, grpcurl and `tlserve predict` over TLS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from certs import Authority, find_grpcurl, make_pki, served_certificate
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter
from serving_helpers import MODEL, LiveServer, photo_bytes, photo_path, server_settings

from tlserve.client import ChannelSecurity, open_channel
from tlserve.server.app import run
from tlserve.server.metrics_http import MetricsServer
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.pb.tlserve.v1 import tlserve_pb2_grpc
from tlserve.server.tls import CertificateFiles, TLSConfigError


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_server(repo_copy, pki):
    server = LiveServer(
        server_settings(repo_copy, tls_cert=str(pki.server[0]), tls_key=str(pki.server[1]), tls_client_ca=str(pki.ca))
    ).start()
    yield server
    server.close()


def list_models(channel: grpc.Channel) -> list[str]:
    return [
        m.name for m in tlserve_pb2_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models
    ]


def refused_code(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as excinfo:
        list_models(channel)
    return excinfo.value.code()


def tls(pki, client=None, **more) -> ChannelSecurity:
    cert, key = client or ("", "")
    return ChannelSecurity(ca=str(pki.ca), cert=str(cert), key=str(key), **more)


def test_tls_serves_and_plaintext_is_refused(make_server, repo_copy, pki):
    server = make_server(repo_copy, tls_cert=str(pki.server[0]), tls_key=str(pki.server[1]))
    address = f"localhost:{server.handle.port}"
    with open_channel(address, tls(pki)) as channel:
        assert list_models(channel) == [MODEL]
    with open_channel(f"127.0.0.1:{server.handle.port}", tls(pki, server_name="localhost")) as channel:
        assert list_models(channel) == [MODEL]
    with grpc.insecure_channel(address) as channel:
        assert refused_code(channel) == grpc.StatusCode.UNAVAILABLE
    other = Authority("another CA").write(pki.ca.parent, "other-ca")
    with open_channel(address, ChannelSecurity(ca=str(other))) as channel:
        assert refused_code(channel) == grpc.StatusCode.UNAVAILABLE, "a server certificate from another CA"
    assert served_certificate(server.handle.port, pki.authority.cert).serial_number == pki.server_issued.serial


def test_mtls_requires_a_client_certificate_from_the_client_ca(mtls_server, pki):
    address = f"localhost:{mtls_server.handle.port}"
    with open_channel(address, tls(pki, pki.client)) as channel:
        assert list_models(channel) == [MODEL]
    with open_channel(address, tls(pki)) as channel:
        assert refused_code(channel) == grpc.StatusCode.UNAVAILABLE, "no client certificate"
    with open_channel(address, tls(pki, pki.rogue_client)) as channel:
        assert refused_code(channel) == grpc.StatusCode.UNAVAILABLE, "a client certificate from another CA"
    assert served_certificate(mtls_server.handle.port, pki.authority.cert, client=pki.client)


def wait_for_serial(port: int, ca: bytes, serial: int, alpn: str = "h2") -> None:
    give_up = time.monotonic() + 30
    while served_certificate(port, ca, alpn).serial_number != serial:
        assert time.monotonic() < give_up, "the rotated certificate was never served"
        time.sleep(0.2)


def test_rotated_certificate_reaches_new_connections_and_open_ones_keep_working(make_server, repo_copy, tmp_path):
    authority = Authority()
    first, second = authority.issue("tlserve-server-1"), authority.issue("tlserve-server-2")
    cert, key = first.write(tmp_path, "tls")
    ca = authority.write(tmp_path)
    server = make_server(repo_copy, tls_cert=str(cert), tls_key=str(key), metrics_tls=True)
    port, metrics_port = server.handle.port, server.handle.metrics_port
    assert served_certificate(port, authority.cert).subject.rfc4514_string() == "CN=tlserve-server-1"
    request = pb.ClassifyRequest(images=[pb.Image(encoded=photo_bytes("coffee.png"))], top_k=1)
    with open_channel(f"localhost:{port}", ChannelSecurity(ca=str(ca))) as old:
        requests: queue.Queue = queue.Queue()
        stream = tlserve_pb2_grpc.InferenceStub(old).ClassifyStream(iter(requests.get, None), timeout=120)
        requests.put(request)
        assert next(stream).results[0].predictions

        second.write(tmp_path, "tls")  # the Secret is rotated: both files replaced
        wait_for_serial(port, authority.cert, second.serial)
        wait_for_serial(metrics_port, authority.cert, second.serial, alpn="http/1.1")

        requests.put(request)  # the stream opened before the rotation still answers
        assert next(stream).results[0].predictions
        requests.put(None)
        assert list(stream) == []
        assert list_models(old) == [MODEL]
    with open_channel(f"localhost:{port}", ChannelSecurity(ca=str(ca))) as new:
        assert list_models(new) == [MODEL]
    assert served_certificate(port, authority.cert).subject.rfc4514_string() == "CN=tlserve-server-2"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_certificate_files_adopt_only_a_consistent_new_pair(tmp_path):
    authority = Authority()
    first, second, third = (authority.issue(f"server-{i}") for i in (1, 2, 3))
    cert, key = first.write(tmp_path, "tls")
    clock = FakeClock()
    files = CertificateFiles(str(cert), str(key), check_interval=1.0, clock=clock)
    assert (files.generation, files.current.cert) == (0, first.cert)

    cert.write_bytes(second.cert)  # half of a rotation: the key is still the old one
    assert files.refresh() == 0, "not looked at before the check interval"
    clock.now += 1.5
    assert files.refresh() == 0 and files.current.cert == first.cert, "a mismatched pair is not adopted"
    key.write_bytes(second.key)
    clock.now += 1.5
    assert files.refresh() == 1 and files.current == files.current.__class__(second.cert, second.key, None)
    clock.now += 1.5
    assert files.refresh() == 1, "unchanged files: same generation"
    third.write(tmp_path, "tls")
    clock.now += 1.5
    assert files.refresh() == 2 and files.current.cert == third.cert


@pytest.mark.parametrize("case", ["missing-key", "mismatched", "garbage-cert", "garbage-ca", "metrics-without-tls"])
def test_unusable_tls_files_refuse_to_start_naming_the_file_not_the_secret(repo_copy, tmp_path, caplog, case):
    authority = Authority()
    good, other = authority.issue("a"), authority.issue("b")
    cert, key = good.write(tmp_path, "tls")
    overrides = dict(tls_cert=str(cert), tls_key=str(key))
    if case == "missing-key":
        overrides["tls_key"] = str(tmp_path / "absent.key")
    elif case == "mismatched":
        key.write_bytes(other.key)
    elif case == "garbage-cert":
        cert.write_bytes(b"not a certificate\n")
    elif case == "garbage-ca":
        (tmp_path / "ca.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
        overrides["tls_client_ca"] = str(tmp_path / "ca.crt")
    else:
        overrides = dict(metrics_tls=True)
    with caplog.at_level(logging.ERROR):
        assert asyncio.run(run(server_settings(repo_copy, **overrides))) == 2
    (message,) = [r.getMessage() for r in caplog.records if "refusing to start" in r.getMessage()]
    assert "PRIVATE KEY" not in message and other.key.decode().splitlines()[1] not in message
    assert ("--metrics-tls" in message) if case == "metrics-without-tls" else (str(tmp_path) in message)


def test_certificate_files_refuse_an_encrypted_key_without_prompting(tmp_path):
    from cryptography.hazmat.primitives import serialization

    issued = Authority().issue("encrypted")
    cert, key = issued.write(tmp_path, "tls")
    private = serialization.load_pem_private_key(issued.key, None)
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(TLSConfigError, match="tls.key"):
        CertificateFiles(str(cert), str(key))


def test_metrics_over_https_only_when_asked(make_server, repo_copy, pki):
    server = make_server(repo_copy, tls_cert=str(pki.server[0]), tls_key=str(pki.server[1]), metrics_tls=True)
    context = ssl.create_default_context(cafile=str(pki.ca))
    url = f"https://localhost:{server.handle.metrics_port}/metrics"
    text = urllib.request.urlopen(url, context=context, timeout=10).read().decode()
    assert "tlserve_model_ready" in text
    with pytest.raises(OSError):  # plain HTTP gets no answer from a TLS port
        urllib.request.urlopen(f"http://127.0.0.1:{server.handle.metrics_port}/metrics", timeout=10).read()
    plain = make_server(repo_copy, tls_cert=str(pki.server[0]), tls_key=str(pki.server[1]))
    text = urllib.request.urlopen(f"http://127.0.0.1:{plain.handle.metrics_port}/metrics", timeout=10).read()
    assert b"tlserve_model_ready" in text


def test_health_only_port_answers_plaintext_probes_under_mtls(make_server, repo_copy, pki):
    server = make_server(
        repo_copy,
        tls_cert=str(pki.server[0]),
        tls_key=str(pki.server[1]),
        tls_client_ca=str(pki.ca),
        health_port=0,
    )
    assert server.handle.health_port > 0
    with grpc.insecure_channel(f"127.0.0.1:{server.handle.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tlserve.v1.Inference", f"tlserve.model.{MODEL}"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        assert refused_code(channel) == grpc.StatusCode.UNIMPLEMENTED, "only health on the plaintext port"


def open_idle(port: int, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if first_bytes:
            sock.sendall(first_bytes)
        sockets.append(sock)
    return sockets


def test_metrics_answer_and_threads_stay_bounded_under_slowloris(live):
    port = live.handle.metrics_port
    url = f"http://127.0.0.1:{port}/metrics"
    assert b"tlserve_model_ready" in urllib.request.urlopen(url, timeout=10).read()
    threads = threading.active_count()
    idle = open_idle(port, 40) + open_idle(port, 10, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    try:
        for _ in range(3):
            assert b"tlserve_model_ready" in urllib.request.urlopen(url, timeout=10).read()
        assert threading.active_count() <= threads + 1, "connections must not cost a thread each"
    finally:
        for sock in idle:
            sock.close()


@contextlib.contextmanager
def metrics_server(**options):
    """A MetricsServer alone on its own event-loop thread, serving one counter."""
    registry = CollectorRegistry()
    Counter("probe", "a sample", registry=registry).inc()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = MetricsServer(registry, "127.0.0.1", 0, **options)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def test_metrics_server_cuts_off_a_request_head_that_never_completes():
    with metrics_server(read_timeout=0.3) as server:
        idle, slow = open_idle(server.port, 1) + open_idle(server.port, 1, b"GET /metr")
        assert closed_by_peer(idle) and closed_by_peer(slow)
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10).read()
        assert b"probe_total 1.0" in body
        with pytest.raises(urllib.error.HTTPError) as excinfo:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=10)
        assert excinfo.value.code == 404


def test_metrics_server_past_its_limit_evicts_the_oldest_idle_connection():
    """Idle peers holding every slot cannot lock a scrape out: the newest connection evicts the oldest
    one that is still waiting for its request head, and the scrape is answered at once."""
    with metrics_server(read_timeout=60, max_connections=3) as server:
        held = open_idle(server.port, 3)
        url = f"http://127.0.0.1:{server.port}/"
        assert b"probe_total" in urllib.request.urlopen(url, timeout=10).read()
        assert closed_by_peer(held[0]), "the oldest idle peer made room"
        for sock in held[1:]:  # the younger idle peers were left alone
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                sock.recv(1)
        for sock in held:
            sock.close()


def test_tritonclient_over_mtls(mtls_server, pki):
    tc = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    address = f"localhost:{mtls_server.handle.port}"
    files = dict(root_certificates=str(pki.ca), private_key=str(pki.client[1]), certificate_chain=str(pki.client[0]))
    with tc.InferenceServerClient(address, ssl=True, **files) as client:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        assert client.get_model_metadata(MODEL).name == MODEL
    with tc.InferenceServerClient(address, ssl=True, root_certificates=str(pki.ca)) as client:
        with pytest.raises(InferenceServerException):
            client.is_server_live()


def test_grpcurl_over_mtls(mtls_server, pki):
    grpcurl = find_grpcurl()
    address = f"127.0.0.1:{mtls_server.handle.port}"
    base = [grpcurl, "-cacert", str(pki.ca), "-cert", str(pki.client[0]), "-key", str(pki.client[1])]
    listed = subprocess.run([*base, address, "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert {"tlserve.v1.Inference", "inference.GRPCInferenceService"} <= set(listed.stdout.split())
    called = subprocess.run(
        [*base, address, "tlserve.v1.Inference/ListModels"], capture_output=True, text=True, timeout=60
    )
    assert called.returncode == 0 and f'"name": "{MODEL}"' in called.stdout, called.stderr
    refused = subprocess.run([grpcurl, "-cacert", str(pki.ca), address, "list"], capture_output=True, timeout=60)
    assert refused.returncode != 0, "no client certificate, no answer"


def test_predict_over_mtls(mtls_server, pki, capsys):
    from tlserve.cli import main

    base = ["predict", "--target", f"127.0.0.1:{mtls_server.handle.port}", "--tls-ca", str(pki.ca)]
    client = ["--tls-cert", str(pki.client[0]), "--tls-key", str(pki.client[1]), "--tls-server-name", "localhost"]
    assert main([*base, *client, str(photo_path("coffee.png"))]) == 0
    assert "coffee.png: " in capsys.readouterr().out
    assert main([*base, "--tls-server-name", "localhost", str(photo_path("coffee.png"))]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_security_flags_come_from_the_command_line_and_the_environment():
    import argparse

    from tlserve.server.settings import Settings, add_arguments

    def parse(argv, env):
        parser = argparse.ArgumentParser()
        add_arguments(parser, env)
        return Settings.from_args(parser.parse_args(argv))

    defaults = parse([], {})
    assert (defaults.tls_cert, defaults.token_file, defaults.metrics_tls) == ("", "", False)
    assert (defaults.reflection, defaults.public_reflection, defaults.health_port) == (True, False, -1)
    flags = parse(["--tls-cert=c", "--tls-key=k", "--tls-client-ca=ca", "--metrics-tls", "--no-reflection"], {})
    assert (flags.tls_cert, flags.tls_key, flags.tls_client_ca, flags.metrics_tls, flags.reflection) == (
        "c",
        "k",
        "ca",
        True,
        False,
    )
    env = {"TLSERVE_TOKEN_FILE": "/t", "TLSERVE_REFLECTION": "false", "TLSERVE_METRICS_TLS": "1"}
    from_env = parse(["--health-port", "8081"], env)
    assert (from_env.token_file, from_env.reflection, from_env.metrics_tls, from_env.health_port) == (
        "/t",
        False,
        True,
        8081,
    )
    assert parse(["--reflection"], env).reflection is True, "a flag beats the environment"
