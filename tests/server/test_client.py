"""tlserve.client against real in-process servers: every input kind, the asyncio client, deadlines,
TLS/mTLS with a token, Embed on a model without an embedding, and its import footprint."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import numpy as np
import pytest
from certs import make_pki
from serving_helpers import MODEL, LiveServer, photo_path

from tlserve.client import AsyncClient, ChannelSecurity, Client, RetryPolicy
from tlserve.client.images import to_image
from tlserve.server.preprocess import ImageLimits, decode

Image = pytest.importorskip("PIL.Image")
PHOTOS = ("chelsea.png", "coffee.png")  # PNG: a PIL image re-encoded as PNG has exactly the same pixels
TOKEN = "client-token-0123456789"


def address(server: LiveServer) -> str:
    return f"127.0.0.1:{server.handle.port}"


@pytest.fixture(scope="module")
def client(live):
    with Client(address(live), timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tensors(live) -> np.ndarray:
    """The photos as the server preprocesses them: uint8 [N, 3, S, S]."""
    pre = live.handle.repository.get(MODEL).manifest.preprocessing
    limits = ImageLimits.from_settings(live.handle.settings)
    return np.stack([decode(photo_path(name).read_bytes(), pre, limits) for name in PHOTOS])


def scores(classified) -> np.ndarray:
    """[N, classes] of a Classify answer asked for every class."""
    out = np.zeros((len(classified.results), len(classified.results[0].predictions)), dtype=np.float32)
    for row, result in zip(out, classified.results):
        for p in result.predictions:
            row[p.index] = p.score
    return out


def test_client_imports_without_onnxruntime_or_torch():
    code = (
        "import sys, tlserve.client, tlserve.client.aio; "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'onnxruntime', 'torch', 'torchvision', 'onnx', "
        "'prometheus_client', 'PIL'}); "
        "print(','.join(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == ""


def test_every_input_kind_gets_the_same_answer(client, tensors):
    paths = [photo_path(name) for name in PHOTOS]
    pictures = [Image.open(path) for path in paths]
    inputs = {
        "paths": [str(p) for p in paths],
        "pathlib": paths,
        "bytes": [p.read_bytes() for p in paths],
        "pil": pictures,
        "hwc arrays": [np.asarray(picture.convert("RGB")) for picture in pictures],
        "chw tensors": list(tensors),
        "a batch array": tensors,
    }
    answers = {kind: client.classify(images, top_k=10) for kind, images in inputs.items()}
    reference = scores(answers["paths"])
    assert reference.shape == (len(PHOTOS), 10)
    for kind, answer in answers.items():
        assert (answer.model, answer.version) == (MODEL, "1"), kind
        np.testing.assert_allclose(scores(answer), reference, atol=1e-6, err_msg=kind)
    top = client.classify(paths[0], top_k=3).results[0]
    assert len(top.predictions) == 3 and top.top.index == int(np.argmax(reference[0]))


def test_embed_and_model_info(client, tensors):
    info = client.model_info()
    from_files = client.embed([photo_path(name) for name in PHOTOS])
    from_tensors = client.embed(tensors)
    assert from_files.vectors.shape == (len(PHOTOS), info.embedding_size) and from_files.vectors.dtype == np.float32
    np.testing.assert_allclose(from_tensors.vectors, from_files.vectors, atol=1e-5)
    assert [m.name for m in client.list_models()] == [MODEL]
    assert (info.name, info.version, info.ready) == (MODEL, "1", True)


def test_async_client_answers_as_the_blocking_one(live, client):
    paths = [photo_path(name) for name in PHOTOS]

    async def main():
        async with AsyncClient(address(live), timeout=60) as aclient:
            await aclient.wait_ready(60)
            together = await asyncio.gather(aclient.classify(paths, top_k=10), aclient.embed(paths))
            info = await aclient.model_info()
            with pytest.raises(grpc.RpcError) as err:
                await aclient.classify(paths, model="no-such-model")
            return together, info, err.value.code()

    (classified, embedded), info, code = asyncio.run(main())
    np.testing.assert_allclose(scores(classified), scores(client.classify(paths, top_k=10)), atol=1e-6)
    np.testing.assert_allclose(embedded.vectors, client.embed(paths).vectors, atol=1e-5)
    assert info.name == MODEL and code == grpc.StatusCode.NOT_FOUND


def test_per_call_deadline(client):
    with pytest.raises(grpc.RpcError) as err:
        client.classify(photo_path("coffee.png"), timeout=1e-6)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.classify(photo_path("coffee.png"), timeout=60).results  # the channel goes on


def test_refused_inputs_are_named_before_any_call():
    with pytest.raises(ValueError, match="must be uint8"):
        to_image(np.zeros((3, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="got shape"):
        to_image(np.zeros((2, 3, 8, 8, 1), dtype=np.uint8))
    with pytest.raises(TypeError, match="cannot send a int"):
        to_image(7)
    with pytest.raises(ValueError, match="max_attempts must be 1 to 5"):
        RetryPolicy(max_attempts=6)


def test_mtls_and_bearer_token(repo_copy, tmp_path, make_server):
    pki = make_pki(tmp_path / "pki")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} infer\n")
    tls = dict(tls_cert=str(pki.server[0]), tls_key=str(pki.server[1]), tls_client_ca=str(pki.ca))
    server = make_server(repo_copy, token_file=str(tokens), **tls)
    target = f"localhost:{server.handle.port}"
    cert, key = pki.client
    as_files = ChannelSecurity(ca=pki.ca, cert=cert, key=key, token=TOKEN)
    as_bytes = ChannelSecurity(ca=pki.ca.read_bytes(), cert=cert.read_bytes(), key=key.read_bytes(), token=TOKEN)
    for security in (as_files, as_bytes):
        with Client(target, security, timeout=60) as c:
            assert c.classify(photo_path("coffee.png")).model == MODEL

    async def aio_call(security):
        async with AsyncClient(target, security, timeout=60) as c:
            return (await c.embed(photo_path("coffee.png"))).vectors.shape[0]

    assert asyncio.run(aio_call(as_files)) == 1
    no_token = ChannelSecurity(ca=pki.ca, cert=cert, key=key)
    with Client(target, no_token, timeout=60) as c, pytest.raises(grpc.RpcError) as err:
        c.classify(photo_path("coffee.png"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as aio_err:
        asyncio.run(aio_call(no_token))
    assert aio_err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(ValueError, match="needs both cert and key"):
        Client(target, ChannelSecurity(ca=pki.ca, cert=cert))


def test_embed_on_a_model_without_embedding_is_failed_precondition(exported_version, tmp_path, make_server):
    from serving_helpers import write_with_manifest

    from tlserve.manifest import Outputs

    write_with_manifest(
        exported_version / "model.onnx", tmp_path / MODEL / "1" / "model.onnx", outputs=Outputs(embedding=None)
    )
    server = make_server(tmp_path)
    with Client(address(server), timeout=60) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.embed(photo_path("coffee.png"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details() == f"model '{MODEL}' has no embedding output"
        assert c.classify(photo_path("coffee.png")).results  # classification is unaffected
