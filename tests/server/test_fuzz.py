"""Hostile callers against one real in-process server (port 0, the exported fashion model).

About 2,000 requests (TLSERVE_FUZZ_EXAMPLES sets the total) drawn by hypothesis from valid ones,
real PNG/JPEG photos and valid uint8 tensors, then mutated (bytes, headers, shapes, datatypes,
names, counts, sizes: see hostile.py), through the task API and the Open Inference Protocol.
Every answer must be a status a caller's mistake may get, with a short message that shows no
path, traceback or long echo of what the caller sent; health stays SERVING and the process's
RSS under the bound after every example. benchmarks/fuzz_hostile.py runs the same strategies
at scale.

The ``test_wide_*`` tests hold the cases the first fuzz found broken (caller strings up to 1 MiB,
shapes numpy cannot hold, a bad ClassifyStream message ending the stream), now fixed.
"""

from __future__ import annotations

import os

import grpc
import pytest

hypothesis = pytest.importorskip("hypothesis")
skimage_data = pytest.importorskip("skimage.data")

import hostile  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from serving_helpers import LiveServer, server_settings  # noqa: E402

from tlserve.server.pb.inference import messages_pb2 as oip  # noqa: E402
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as task  # noqa: E402

pytestmark = pytest.mark.slow

LIMITS = {"max_images": 4, "max_image_bytes": 2_000_000, "max_pixels": 4_000_000, "max_message_bytes": 16 << 20}
TOTAL = int(os.environ.get("TLSERVE_FUZZ_EXAMPLES", "2000"))
MAIN_SHARE = 0.93  # the rest: the wide fuzz and the explicit cases below

settings.register_profile(
    "tlserve-fuzz",
    deadline=None,
    derandomize=True,  # the same examples on every run: a CI failure reproduces locally
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)


def examples(share: float, **overrides) -> settings:
    return settings(settings.get_profile("tlserve-fuzz"), max_examples=max(1, round(TOTAL * share)), **overrides)


@pytest.fixture(scope="module")
def fuzzer(repo_copy, tmp_path_factory):
    server = LiveServer(server_settings(repo_copy, max_queue_delay_ms=1.0, **LIMITS)).start()
    secrets = (str(repo_copy), str(tmp_path_factory.getbasetemp()))
    target = hostile.discover(server.channel, LIMITS, secrets)
    # this process already holds torch and the session's export: bound what the fuzz adds to it
    yield hostile.Fuzzer(server.channel, target, hostile.rss_bytes, hostile.rss_bytes() + hostile.RSS_GROWTH)
    server.close()


@pytest.fixture(scope="module")
def seeds(fuzzer) -> hostile.Seeds:
    return hostile.load_seeds(skimage_data.data_dir, fuzzer.target.input_size)


@pytest.fixture(scope="module")
def strategies(fuzzer, seeds) -> dict[str, st.SearchStrategy[hostile.Case]]:
    return hostile.groups(seeds, fuzzer.target)


# --- the seeds are valid: what the fuzz mutates is answered OK -----------------------------------
def valid_cases(target: hostile.Target, seeds: hostile.Seeds, photo: str) -> list[hostile.Case]:
    size = target.input_size
    tensor = task.Tensor(shape=[3, size, size], data=seeds.tensors[photo])
    raw = oip.ModelInferRequest(model_name=target.model, raw_input_contents=[seeds.tensors[photo]])
    raw.inputs.add(name=target.input_name, datatype=target.datatype, shape=[1, 3, size, size])
    typed = oip.ModelInferRequest(model_name=target.model)
    typed.inputs.add(name=target.input_name, datatype=target.datatype, shape=[1, 3, size, size])
    typed.inputs[0].contents.uint_contents.extend(seeds.tensors[photo])
    return [
        hostile.Case("Classify", [task.ClassifyRequest(images=[task.Image(encoded=seeds.files[photo])], top_k=3)]),
        hostile.Case("Embed", [task.EmbedRequest(images=[task.Image(tensor=tensor)])]),
        hostile.Case("ModelInfer", [raw]),
        hostile.Case("ModelStreamInfer", [typed, raw]),
    ]


@pytest.mark.parametrize("photo", hostile.PHOTOS)
def test_every_seed_is_answered_ok_before_it_is_mutated(fuzzer, seeds, photo):
    for case in valid_cases(fuzzer.target, seeds, photo):
        answer = fuzzer.check(case)
        assert answer.code == grpc.StatusCode.OK and not answer.in_band, case
        assert len(answer.responses) == len(case.requests)


# --- the fuzz ------------------------------------------------------------------------------------
@examples(hostile.SHARES["classify"] * MAIN_SHARE)
@given(data=st.data())
def test_classify_and_embed_answer_hostile_images_with_expected_statuses(fuzzer, strategies, data):
    fuzzer.check(data.draw(strategies["classify"], label="case"))


@examples(hostile.SHARES["task stream"] * MAIN_SHARE)
@given(data=st.data())
def test_classify_stream_answers_hostile_requests_with_expected_statuses(fuzzer, strategies, data):
    fuzzer.check(data.draw(strategies["task stream"], label="case"))


@examples(hostile.SHARES["lookups"] * MAIN_SHARE)
@given(data=st.data())
def test_model_lookups_answer_hostile_names_with_expected_statuses(fuzzer, strategies, data):
    """GetModelInfo, ModelMetadata, ModelReady, ModelConfig."""
    fuzzer.check(data.draw(strategies["lookups"], label="case"))


@examples(hostile.SHARES["infer"] * MAIN_SHARE)
@given(data=st.data())
def test_model_infer_answers_hostile_tensors_with_expected_statuses(fuzzer, strategies, data):
    fuzzer.check(data.draw(strategies["infer"], label="case"))


@examples(hostile.SHARES["oip stream"] * MAIN_SHARE)
@given(data=st.data())
def test_model_stream_infer_answers_each_hostile_request_in_band(fuzzer, strategies, data):
    fuzzer.check(data.draw(strategies["oip stream"], label="case"))


# --- wide: long strings and shapes numpy cannot hold (found broken by the first fuzz, now fixed) ---
def infer_case(target: hostile.Target, shape: list[int], contents: str, rpc: str = "ModelInfer") -> hostile.Case:
    request = oip.ModelInferRequest(model_name=target.model)
    tensor = request.inputs.add(name=target.input_name, datatype=target.datatype, shape=shape)
    count = 1 if 0 not in shape else 0
    if contents == "raw":
        request.raw_input_contents.append(b"\x07" * count)
    else:
        tensor.contents.uint_contents.extend([7] * count)
    return hostile.Case(rpc, [request])


NUMPY_CANNOT_HOLD = {"rank 70": [1] * 70, "rank 65 of zeros": [0] * 65, "zero beside 2**62 dims": [0, 2**62, 2**62]}


@pytest.mark.parametrize("rpc", ["ModelInfer", "ModelStreamInfer"])
@pytest.mark.parametrize("contents", ["raw", "typed"])
@pytest.mark.parametrize("shape", NUMPY_CANNOT_HOLD.values(), ids=NUMPY_CANNOT_HOLD)
def test_wide_oip_shapes_numpy_cannot_hold_are_invalid_argument(fuzzer, shape, contents, rpc):
    """Today these reach numpy's reshape and come back INTERNAL."""
    fuzzer.check(infer_case(fuzzer.target, shape, contents, rpc))


MEGA = "x" * (1 << 20)
LONG = "é\x00" * 2048


def long_string_cases(target: hostile.Target) -> dict[str, hostile.Case]:
    size = target.input_size
    infer = infer_case(target, [1, 3, size, size], "raw")
    renamed, retyped, unknown_output = (oip.ModelInferRequest() for _ in range(3))
    for request in (renamed, retyped, unknown_output):
        request.CopyFrom(infer.requests[0])
        request.raw_input_contents[0] = b"\x07" * (3 * size * size)
    renamed.inputs[0].name = LONG
    retyped.inputs[0].datatype = LONG
    unknown_output.outputs.add(name=LONG)
    return {
        "GetModelInfo name 1 MiB": hostile.Case(
            "GetModelInfo", [task.GetModelInfoRequest(model=task.ModelRef(name=MEGA))]
        ),
        "ModelMetadata name 1 MiB": hostile.Case("ModelMetadata", [oip.ModelMetadataRequest(name=MEGA)]),
        "ModelConfig version 4 KiB": hostile.Case(
            "ModelConfig", [oip.ModelConfigRequest(name=target.model, version=LONG)]
        ),
        "Classify version 4 KiB": hostile.Case(
            "Classify", [task.ClassifyRequest(model=task.ModelRef(name=target.model, version=LONG))]
        ),
        "ModelInfer input name 4 KiB": hostile.Case("ModelInfer", [renamed]),
        "ModelInfer datatype 4 KiB": hostile.Case("ModelInfer", [retyped]),
        "ModelInfer output name 4 KiB": hostile.Case("ModelInfer", [unknown_output]),
        "ModelStreamInfer datatype 4 KiB": hostile.Case("ModelStreamInfer", [retyped]),
    }


LONG_STRING_CASES = [
    "GetModelInfo name 1 MiB",
    "ModelMetadata name 1 MiB",
    "ModelConfig version 4 KiB",
    "Classify version 4 KiB",
    "ModelInfer input name 4 KiB",
    "ModelInfer datatype 4 KiB",
    "ModelInfer output name 4 KiB",
    "ModelStreamInfer datatype 4 KiB",
]


@pytest.mark.parametrize("name", LONG_STRING_CASES)
def test_wide_long_caller_strings_are_quoted_short(fuzzer, name):
    """Today a message quotes the whole caller string (errors.quote shortens it)."""
    fuzzer.check(long_string_cases(fuzzer.target)[name])


def test_wide_classify_stream_answers_a_good_request_after_a_bad_one(fuzzer, seeds):
    """Today one bad message ends the whole stream with its status."""
    good = task.ClassifyRequest(images=[task.Image(encoded=seeds.files["chelsea.png"])])
    case = hostile.Case("ClassifyStream", [task.ClassifyRequest(), good])
    answer = fuzzer.check(case)
    assert answer.code == grpc.StatusCode.OK
    assert len(answer.responses) == 2 and len(answer.responses[1].results) == 1


@examples(0.05, phases=[Phase.explicit, Phase.generate])  # no shrinking while it is expected to fail
@given(data=st.data())
def test_wide_fuzz_of_long_strings_and_shapes_past_numpy(fuzzer, seeds, data):
    """The fuzz of every group where each caller string is 101 chars to 1 MiB and each free shape
    past numpy's limits: what the main fuzz leaves out."""
    fuzzer.check(data.draw(hostile.mixed(hostile.groups(seeds, fuzzer.target, hostile.PENDING)), label="case"))


def test_rss_after_the_fuzz_stays_inside_the_bound(fuzzer):
    """RSS is sampled after every example above; here, the peak and the end, against the same bound."""
    end = fuzzer.rss()
    assert max(fuzzer.rss_peak, end) <= fuzzer.rss_bound, (
        f"RSS {fuzzer.rss_start / 2**20:.0f} MiB at the start, peak {fuzzer.rss_peak / 2**20:.0f} MiB, "
        f"{end / 2**20:.0f} MiB at the end: over the bound of {fuzzer.rss_bound / 2**20:.0f} MiB"
    )
