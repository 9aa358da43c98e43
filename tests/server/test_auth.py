"""Token auth through the real server on port 0 (over TLS): every RPC of both services, found by
walking their descriptors, refuses a missing or unknown token (UNAUTHENTICATED) and a token without
its scope (PERMISSION_DENIED) before any message is read, counts each refusal, and admits the right
scope; health stays open, reflection is gated or off; the token file reloads; unmodified
tritonclient (headers=), grpcurl (-H) and `tlserve predict --token-file` authenticate."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
from certs import find_grpcurl, make_pki
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving_helpers import MODEL, LiveServer, photo_bytes, photo_path, server_settings

from tlserve.client import ChannelSecurity, open_channel
from tlserve.server.app import run
from tlserve.server.auth import ADMIN, INFER, METHOD_SCOPES, MISSING, OPEN, required_scope
from tlserve.server.oip.reflection import reflection_pool
from tlserve.server.oip.servicer import SERVICE_NAME as OIP_SERVICE
from tlserve.server.pb.tlserve.v1 import tlserve_pb2
from tlserve.server.preprocess import ImageLimits, decode
from tlserve.server.tokens import TokenFile, TokenFileError, parse_tokens

INFER_TOKEN = "infer-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789"
BOTH_TOKEN = "both-token-0123456789abc"
WRONG_TOKEN = "wrong-token-0123456789"
TOKEN_FILE = f"""# tlserve test tokens: <token> <scopes>
{INFER_TOKEN} infer

{ADMIN_TOKEN}   admin
{BOTH_TOKEN} infer,admin
"""


def service_methods() -> list[MethodDescriptor]:
    """Every method of the task API and of the Open Inference Protocol, from their descriptors."""
    task = tlserve_pb2.DESCRIPTOR.services_by_name["Inference"]
    oip = reflection_pool().FindServiceByName(OIP_SERVICE)
    return [*task.methods, *oip.methods]


METHODS = {f"/{m.containing_service.full_name}/{m.name}": m for m in service_methods()}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("secrets") / "tokens"
    path.write_text(TOKEN_FILE)
    return path


def protected(repo_copy, pki, token_file, **more) -> LiveServer:
    tls = dict(tls_cert=str(pki.server[0]), tls_key=str(pki.server[1]))
    return LiveServer(server_settings(repo_copy, token_file=str(token_file), **tls, **more)).start()


@pytest.fixture(scope="module")
def served(repo_copy, pki, token_file):
    server = protected(repo_copy, pki, token_file)
    yield server
    server.close()


@pytest.fixture(scope="module")
def channel(served, pki):
    with open_channel(f"localhost:{served.handle.port}", ChannelSecurity(ca=str(pki.ca))) as channel:
        yield channel


def call(channel: grpc.Channel, path: str, method: MethodDescriptor, metadata=(), send: bool = False):
    """Call ``path`` with raw bytes (an empty message); with ``send`` False a stream's requests never come.

    Returns the status code the call ended with and its details.
    """
    release = threading.Event()

    def held():
        if send:
            yield b""
        else:
            release.wait(60)
            yield from ()

    kind = (method.client_streaming, method.server_streaming)
    try:
        if kind == (False, False):
            channel.unary_unary(path)(b"", metadata=metadata, timeout=30)
        elif kind == (False, True):
            list(channel.unary_stream(path)(b"", metadata=metadata, timeout=30))
        elif kind == (True, False):
            channel.stream_unary(path)(held(), metadata=metadata, timeout=30)
        else:
            list(channel.stream_stream(path)(held(), metadata=metadata, timeout=30))
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    finally:
        release.set()
    return grpc.StatusCode.OK, ""


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_every_rpc_of_both_services_is_in_the_scope_table():
    assert {p: required_scope(p) for p in METHODS} == {
        p: (ADMIN if p == "/tlserve.v1.Inference/ReloadRepository" else INFER) for p in METHODS
    }
    missing = sorted(set(METHODS) - set(METHOD_SCOPES))
    assert not missing, f"give these RPCs a scope in tlserve.server.auth.METHOD_SCOPES: {missing}"


def test_scope_table_defaults_and_open_services():
    assert required_scope("/tlserve.v1.Inference/SomeFutureModelControl") == ADMIN, "deny by default"
    assert required_scope("/inference.GRPCInferenceService/RepositoryModelLoad") == ADMIN
    assert required_scope("/grpc.health.v1.Health/Check") == OPEN == required_scope("/grpc.health.v1.Health/Watch")
    reflect = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    assert required_scope(reflect) == INFER and required_scope(reflect, public_reflection=True) == OPEN


# (token, expected code, refusal reason or None) for a method needing `scope`
def cases(scope: str) -> dict[str, tuple[tuple, grpc.StatusCode | None, str | None]]:
    wrong_scope = ADMIN_TOKEN if scope == INFER else INFER_TOKEN
    right = INFER_TOKEN if scope == INFER else ADMIN_TOKEN
    return {
        "missing": ((), grpc.StatusCode.UNAUTHENTICATED, "missing"),
        "unknown": (bearer(WRONG_TOKEN), grpc.StatusCode.UNAUTHENTICATED, "invalid"),
        "not-bearer": ((("authorization", f"Basic {INFER_TOKEN}"),), grpc.StatusCode.UNAUTHENTICATED, "invalid"),
        "wrong-scope": (bearer(wrong_scope), grpc.StatusCode.PERMISSION_DENIED, "scope"),
        "right-scope": (bearer(right), None, None),
        "both-scopes": (bearer(BOTH_TOKEN), None, None),
    }


@pytest.mark.parametrize("case", list(cases(INFER)))
@pytest.mark.parametrize("path", list(METHODS))
def test_every_rpc_refuses_what_it_must_and_admits_its_scope(served, channel, path, case):
    method, scope = METHODS[path], required_scope(path)
    metadata, expected, reason = cases(scope)[case]
    rpc = path.rsplit("/", 1)[1]
    before = served.metric("tlserve_auth_refusals_total", rpc=rpc, reason=reason) or 0.0
    code, details = call(channel, path, method, metadata, send=expected is None)
    if expected is None:
        assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), details
        return
    assert code == expected, details
    assert served.metric("tlserve_auth_refusals_total", rpc=rpc, reason=reason) == before + 1
    for token in (INFER_TOKEN, ADMIN_TOKEN, WRONG_TOKEN):
        assert token not in details, "a refusal never echoes the token"
    if reason == "missing":
        assert details == MISSING
    if reason == "scope":
        assert details == f"token lacks scope '{scope}' required by {path}"


def test_a_refused_stream_is_refused_before_any_message(channel):
    """The held request iterator never yields: the refusal comes anyway, for each streaming RPC."""
    streams = [p for p, m in METHODS.items() if m.client_streaming]
    assert streams
    for path in streams:
        assert call(channel, path, METHODS[path], bearer(ADMIN_TOKEN))[0] == grpc.StatusCode.PERMISSION_DENIED


def test_admin_does_not_imply_infer_and_a_token_may_hold_both(channel):
    classify = "/tlserve.v1.Inference/ListModels"
    reload = "/tlserve.v1.Inference/ReloadRepository"
    assert call(channel, classify, METHODS[classify], bearer(ADMIN_TOKEN))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert call(channel, reload, METHODS[reload], bearer(INFER_TOKEN))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert call(channel, classify, METHODS[classify], bearer(BOTH_TOKEN))[0] == grpc.StatusCode.OK
    assert call(channel, reload, METHODS[reload], bearer(BOTH_TOKEN))[0] == grpc.StatusCode.OK


def test_health_needs_no_token(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", f"tlserve.model.{MODEL}"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def list_services(channel: grpc.Channel, metadata=()) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)
    return [s.name for s in reply.list_services_response.service]


def test_reflection_needs_an_infer_token_by_default(channel):
    with pytest.raises(grpc.RpcError) as excinfo:
        list_services(channel)
    assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as excinfo:
        list_services(channel, bearer(ADMIN_TOKEN))
    assert excinfo.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert OIP_SERVICE in list_services(channel, bearer(INFER_TOKEN))


@pytest.mark.parametrize("options", [{"public_reflection": True}, {"reflection": False}], ids=["public", "off"])
def test_reflection_can_be_opened_or_turned_off(repo_copy, pki, token_file, options):
    server = protected(repo_copy, pki, token_file, **options)
    try:
        with open_channel(f"localhost:{server.handle.port}", ChannelSecurity(ca=str(pki.ca))) as channel:
            if options.get("public_reflection"):
                assert "tlserve.v1.Inference" in list_services(channel)
            else:
                with pytest.raises(grpc.RpcError) as excinfo:
                    list_services(channel, bearer(INFER_TOKEN))
                assert excinfo.value.code() == grpc.StatusCode.UNIMPLEMENTED
            path = "/tlserve.v1.Inference/ListModels"
            assert call(channel, path, METHODS[path])[0] == grpc.StatusCode.UNAUTHENTICATED, "the APIs stay closed"
    finally:
        server.close()


def test_the_token_file_reloads_while_serving(repo_copy, pki, tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{INFER_TOKEN} infer\n")
    server = protected(repo_copy, pki, path)
    rotated = "rotated-token-0123456789"
    list_models = "/tlserve.v1.Inference/ListModels"
    try:
        with open_channel(f"localhost:{server.handle.port}", ChannelSecurity(ca=str(pki.ca))) as channel:
            assert call(channel, list_models, METHODS[list_models], bearer(INFER_TOKEN))[0] == grpc.StatusCode.OK
            tmp = tmp_path / ".tokens.tmp"
            tmp.write_text(f"# rotated\n{rotated} infer\n")
            os.replace(tmp, path)  # how a Secret update lands: an atomic swap
            give_up = time.monotonic() + 30
            while call(channel, list_models, METHODS[list_models], bearer(rotated))[0] != grpc.StatusCode.OK:
                assert time.monotonic() < give_up, "the new token was never accepted"
                time.sleep(0.2)
            code = call(channel, list_models, METHODS[list_models], bearer(INFER_TOKEN))[0]
            assert code == grpc.StatusCode.UNAUTHENTICATED, "the removed token is refused"
    finally:
        server.close()


def test_a_bad_token_file_on_reload_keeps_the_previous_tokens(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{INFER_TOKEN} infer\n")
    tokens = TokenFile(str(path))
    path.write_text(f"{ADMIN_TOKEN} admin,root\n")
    assert tokens.check() is False
    assert tokens.scopes(INFER_TOKEN) == {"infer"} and tokens.scopes(ADMIN_TOKEN) is None
    assert tokens.check() is False, "an unchanged bad file is not re-read"
    path.write_text(f"{ADMIN_TOKEN} admin\n")
    assert tokens.check() is True
    assert tokens.scopes(ADMIN_TOKEN) == {"admin"} and tokens.scopes(INFER_TOKEN) is None


@pytest.mark.parametrize(
    "text,problem",
    [
        (f"{INFER_TOKEN}\n", "2 fields, got 1"),
        (f"{INFER_TOKEN} infer extra\n", "2 fields, got 3"),
        (f"# ok\n\n{INFER_TOKEN} infer,root\n", "line 3: scopes must be"),
        (f"{INFER_TOKEN} ,\n", "scopes must be"),
        ("short infer\n", "at least 16"),
        (f"{INFER_TOKEN} infer\n{INFER_TOKEN} admin\n", "line 2: the same token appears twice"),
        ("# only comments\n\n", "holds no token"),
    ],
)
def test_malformed_token_files_are_refused_without_echoing_the_token(text, problem):
    with pytest.raises(TokenFileError) as excinfo:
        parse_tokens(text, "tokens")
    assert problem in str(excinfo.value)
    assert INFER_TOKEN not in str(excinfo.value) and "short" not in str(excinfo.value)


def test_parse_tokens_ignores_comments_and_blank_lines():
    tokens = parse_tokens(TOKEN_FILE)
    assert sorted(sorted(s) for s in tokens.values()) == [["admin"], ["admin", "infer"], ["infer"]]


def test_a_malformed_token_file_refuses_to_start(repo_copy, tmp_path, caplog):
    path = tmp_path / "tokens"
    path.write_text(f"{INFER_TOKEN} infer\n{WRONG_TOKEN} everything\n")
    with caplog.at_level(logging.ERROR):
        assert asyncio.run(run(server_settings(repo_copy, token_file=str(path)))) == 2
    (message,) = [r.getMessage() for r in caplog.records if "refusing to start" in r.getMessage()]
    assert f"{path} line 2" in message and WRONG_TOKEN not in message and INFER_TOKEN not in message


@pytest.fixture(scope="module")
def tensor(served):
    model = served.handle.repository.get(MODEL)
    return decode(
        photo_bytes("coffee.png"), model.manifest.preprocessing, ImageLimits.from_settings(served.handle.settings)
    )[None]


def test_tritonclient_over_tls_with_token_headers(served, pki, tensor):
    tc = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    calls = {
        "live": lambda c, h: c.is_server_live(headers=h),
        "ready": lambda c, h: c.is_server_ready(headers=h),
        "server-metadata": lambda c, h: c.get_server_metadata(headers=h),
        "model-ready": lambda c, h: c.is_model_ready(MODEL, headers=h),
        "model-metadata": lambda c, h: c.get_model_metadata(MODEL, headers=h),
        "model-config": lambda c, h: c.get_model_config(MODEL, headers=h),
        "statistics": lambda c, h: c.get_inference_statistics(MODEL, headers=h),
        "infer": lambda c, h: c.infer(MODEL, [images(tc, tensor)], headers=h),
    }
    with tc.InferenceServerClient(f"localhost:{served.handle.port}", ssl=True, root_certificates=str(pki.ca)) as c:
        for name, rpc in calls.items():
            for headers, status in ((None, "UNAUTHENTICATED"), (header(ADMIN_TOKEN), "PERMISSION_DENIED")):
                with pytest.raises(InferenceServerException) as excinfo:
                    rpc(c, headers)
                assert excinfo.value.status() == f"StatusCode.{status}", name
            assert rpc(c, header(INFER_TOKEN)) is not None, name
        probabilities = c.infer(MODEL, [images(tc, tensor)], headers=header(INFER_TOKEN)).as_numpy("probabilities")
        assert probabilities.shape[0] == 1 and np.isclose(probabilities.sum(), 1.0, atol=1e-3)


def test_tritonclient_stream_needs_a_token(served, pki, tensor):
    tc = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    address = f"localhost:{served.handle.port}"
    for headers, expected in ((None, "StatusCode.UNAUTHENTICATED"), (header(INFER_TOKEN), None)):
        results: queue.Queue = queue.Queue()
        with tc.InferenceServerClient(address, ssl=True, root_certificates=str(pki.ca)) as client:
            client.start_stream(callback=lambda result, error, q=results: q.put((result, error)), headers=headers)
            try:
                client.async_stream_infer(MODEL, [images(tc, tensor)], request_id="one")
            except InferenceServerException:  # refused before the first message: the stream is already closed
                assert expected is not None
            result, error = results.get(timeout=60)
            client.stop_stream()
        if expected is None:
            assert error is None and result.get_response().id == "one"
        else:
            assert result is None and error.status() == expected


def images(tc, batch: np.ndarray):
    tensor = tc.InferInput("images", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    return tensor


def header(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_grpcurl_over_tls_with_a_bearer_header(served, pki):
    grpcurl = find_grpcurl()
    address = f"127.0.0.1:{served.handle.port}"

    def grpcurl_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([grpcurl, "-cacert", str(pki.ca), *args], capture_output=True, text=True, timeout=60)

    listed = grpcurl_run("-H", f"authorization: Bearer {INFER_TOKEN}", address, "list")
    assert listed.returncode == 0 and "tlserve.v1.Inference" in listed.stdout.split(), listed.stderr
    models = grpcurl_run("-H", f"authorization: Bearer {INFER_TOKEN}", address, "tlserve.v1.Inference/ListModels")
    assert models.returncode == 0 and f'"name": "{MODEL}"' in models.stdout, models.stderr
    refused = grpcurl_run(address, "list")
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr
    reload = "tlserve.v1.Inference/ReloadRepository"
    denied = grpcurl_run("-H", f"authorization: Bearer {INFER_TOKEN}", address, reload)
    assert denied.returncode != 0 and "PermissionDenied" in denied.stderr and INFER_TOKEN not in denied.stderr
    admitted = grpcurl_run(
        "-reflect-header",
        f"authorization: Bearer {INFER_TOKEN}",
        "-rpc-header",
        f"authorization: Bearer {ADMIN_TOKEN}",
        address,
        reload,
    )
    assert admitted.returncode == 0, admitted.stderr


def test_predict_with_a_token_file(served, pki, token_file, capsys):
    from tlserve.cli import main

    base = ["predict", "--target", f"localhost:{served.handle.port}", "--tls-ca", str(pki.ca)]
    photo = str(photo_path("coffee.png"))
    assert main([*base, "--token-file", str(token_file), photo]) == 0, "the first token line is the infer token"
    assert "coffee.png: " in capsys.readouterr().out
    assert main([*base, "--token", ADMIN_TOKEN, photo]) == 1
    err = capsys.readouterr().err
    assert "PERMISSION_DENIED" in err and "lacks scope 'infer'" in err
    assert main([*base, photo]) == 1
    assert "UNAUTHENTICATED: missing bearer token" in capsys.readouterr().err
