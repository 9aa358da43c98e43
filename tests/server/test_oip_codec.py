"""Tensor codecs of the Open Inference Protocol front end, fed by tritonclient's own request
builder (serialised and parsed back, so the wire format is checked too) and real photos."""

import numpy as np
import pytest
from PIL import Image

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
skimage_data = pytest.importorskip("skimage.data")

from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult  # noqa: E402
from tritonclient.grpc._utils import _get_inference_request  # noqa: E402

from tlserve.server.errors import InvalidArgument  # noqa: E402
from tlserve.server.oip import codec  # noqa: E402
from tlserve.server.pb.inference import messages_pb2 as pb  # noqa: E402


def photo_chw(name: str, size: int = 32) -> np.ndarray:
    rgb = Image.open(f"{skimage_data.data_dir}/{name}").convert("RGB").resize((size, size))
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return np.stack([photo_chw("chelsea.png"), photo_chw("coffee.png"), photo_chw("rocket.jpg")])


def to_our_request(inputs, outputs=None) -> pb.ModelInferRequest:
    theirs = _get_inference_request("fashion", inputs, "", "", outputs, 0, False, False, 0, None, None)
    return pb.ModelInferRequest.FromString(theirs.SerializeToString())


def one_input(array: np.ndarray, datatype: str) -> InferInput:
    tensor = InferInput("images", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def typed_request(array: np.ndarray, datatype: str) -> pb.ModelInferRequest:
    """tritonclient's gRPC client always sends raw bytes; typed contents are built by hand."""
    request = pb.ModelInferRequest(model_name="fashion")
    tensor = request.inputs.add(name="images", datatype=datatype, shape=array.shape)
    getattr(tensor.contents, codec.TYPED_FIELDS[datatype]).extend(array.ravel().tolist())
    return request


@pytest.mark.parametrize("datatype", ["UINT8", "FP32", "FP16"])
def test_raw_contents_round_trip(photos, datatype):
    array = photos.astype(codec.DTYPES[datatype])
    decoded = codec.decode_inputs(to_our_request([one_input(array, datatype)]))
    assert decoded["images"].dtype == array.dtype
    np.testing.assert_array_equal(decoded["images"], array)


@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_typed_contents_round_trip(photos, datatype):
    array = photos.astype(codec.DTYPES[datatype])
    decoded = codec.decode_inputs(typed_request(array, datatype))
    assert decoded["images"].dtype == array.dtype
    np.testing.assert_array_equal(decoded["images"], array)


def test_fp16_has_no_typed_field(photos):
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="images", datatype="FP16", shape=photos.shape)
    tensor.contents.fp32_contents.extend(photos.ravel().astype(np.float32))
    with pytest.raises(InvalidArgument, match="FP16 has no typed contents"):
        codec.decode_inputs(request)


def test_uint8_values_out_of_range_are_refused(photos):
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=[1, 1, 1, 2])
    tensor.contents.uint_contents.extend([7, 300])
    with pytest.raises(InvalidArgument, match=r"out of the UINT8 range \[0, 255\]"):
        codec.decode_inputs(request)


def test_raw_bytes_must_match_the_shape(photos):
    request = to_our_request([one_input(photos, "UINT8")])
    request.raw_input_contents[0] = request.raw_input_contents[0][:-1]
    with pytest.raises(InvalidArgument, match=r"'images': 9215 raw bytes, but UINT8 shape \[3, 3, 32, 32\] needs 9216"):
        codec.decode_inputs(request)


def test_typed_count_must_match_the_shape(photos):
    request = typed_request(photos.astype(np.float32), "FP32")
    request.inputs[0].shape[0] = 4
    with pytest.raises(InvalidArgument, match="needs 12288"):
        codec.decode_inputs(request)


def test_unknown_datatype_and_mixed_contents_are_refused(photos):
    request = to_our_request([one_input(photos, "UINT8")])
    request.inputs[0].datatype = "BF16"
    with pytest.raises(InvalidArgument, match="unsupported datatype 'BF16'"):
        codec.decode_inputs(request)
    request.inputs[0].datatype = "UINT8"
    request.inputs[0].contents.uint_contents.append(1)
    with pytest.raises(InvalidArgument, match="typed contents and raw_input_contents together"):
        codec.decode_inputs(request)


def test_one_raw_entry_per_input(photos):
    request = to_our_request([one_input(photos, "UINT8")])
    request.raw_input_contents.append(b"")
    with pytest.raises(InvalidArgument, match="2 raw_input_contents for 1 inputs"):
        codec.decode_inputs(request)


def test_negative_dimensions_are_refused():
    request = pb.ModelInferRequest(raw_input_contents=[b""])
    request.inputs.add(name="images", datatype="UINT8", shape=[-1, 3])
    with pytest.raises(InvalidArgument, match="negative dimension"):
        codec.decode_inputs(request)


def test_outputs_read_back_by_tritonclient(photos):
    probabilities = np.random.default_rng(0).dirichlet(np.ones(10), size=3).astype(np.float32)
    embedding = photos.reshape(3, -1)[:, :40].astype(np.float16)
    response = pb.ModelInferResponse(model_name="fashion", model_version="1")
    codec.encode_outputs(response, {"probabilities": probabilities, "embedding": embedding})
    theirs = tritonclient_grpc.service_pb2.ModelInferResponse.FromString(response.SerializeToString())
    result = InferResult(theirs)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    np.testing.assert_array_equal(result.as_numpy("embedding"), embedding)
    assert result.get_output("embedding").datatype == "FP16"


def test_datatype_names():
    assert codec.datatype_of("uint8") == "UINT8"
    assert codec.datatype_of(np.float16) == "FP16"
    with pytest.raises(ValueError):
        codec.datatype_of(np.complex64)


def test_requested_outputs_parse():
    request = to_our_request(
        [one_input(np.zeros((1, 3, 2, 2), np.uint8), "UINT8")], [InferRequestedOutput("embedding")]
    )
    assert [o.name for o in request.outputs] == ["embedding"]


def test_huge_shape_cannot_overflow_the_byte_count():
    with pytest.raises(InvalidArgument, match="needs"):
        codec.decode_raw("images", "UINT8", [2**62, 4], b"")


def test_small_raw_requests_convert_on_the_loop_typed_and_large_ones_off_it():
    small = to_our_request([one_input(np.zeros((1, 3, 224, 224), np.uint8), "UINT8")])  # 147 KiB
    large = to_our_request([one_input(np.zeros((2, 3, 224, 224), np.uint8), "UINT8")])  # 294 KiB
    typed = typed_request(np.zeros((1, 3, 8, 8), np.uint8), "UINT8")
    assert codec.converts_inline(small, codec.input_headers(small))
    assert not codec.converts_inline(large, codec.input_headers(large))
    assert not codec.converts_inline(typed, codec.input_headers(typed))
    # a raw input longer than its shape says is still refused, by the conversion
    short = to_our_request([one_input(np.zeros((1, 3, 8, 8), np.uint8), "UINT8")])
    short.inputs[0].shape[:] = [1, 3, 8, 7]
    assert codec.converts_inline(short, codec.input_headers(short))
    with pytest.raises(InvalidArgument, match="192 raw bytes, but UINT8 shape"):
        codec.decode_inputs(short)
