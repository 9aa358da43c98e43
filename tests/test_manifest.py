"""The model manifest: the contract every part reads and writes."""

import json

import pytest

from tlserve.manifest import METADATA_KEY, Manifest, ManifestError, Preprocessing

LABELS = ("cat", "dog", "bird")


def make(**changes):
    base = dict(
        name="pets",
        version="1",
        architecture="mobilenet_v2",
        labels=LABELS,
        preprocessing=Preprocessing(input_size=224, resize_size=256),
    )
    base.update(changes)
    return Manifest(**base)


def test_round_trip_through_metadata():
    manifest = make(provenance={"strategy": "two-phase", "val": {"accuracy": 0.9}})
    back = Manifest.from_metadata({METADATA_KEY: manifest.to_json()})
    assert back == manifest
    assert back.num_classes == 3
    assert json.loads(manifest.to_json())["schema_version"] == 1


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"labels": ("only",)}, "at least 2 labels"),
        ({"labels": ("a", "a")}, "unique"),
        ({"name": "a/b"}, "model name"),
        ({"precision": "fp8"}, "precision"),
        ({"schema_version": 99}, "schema_version 99"),
    ],
)
def test_invalid_manifests_are_refused(changes, message):
    with pytest.raises(ManifestError, match=message):
        make(**changes)


@pytest.mark.parametrize(
    "pre, message",
    [
        ({"input_size": 224, "resize_size": 200}, "input_size <= resize_size"),
        ({"input_size": 64, "resize_size": 64, "interpolation": "lanczos9"}, "interpolation"),
        ({"input_size": 64, "resize_size": 64, "std": (0.2, 0.0, 0.2)}, "std > 0"),
    ],
)
def test_invalid_preprocessing_is_refused(pre, message):
    with pytest.raises(ManifestError, match=message):
        Preprocessing(**pre)


def test_missing_or_malformed_metadata_names_the_problem():
    with pytest.raises(ManifestError, match="tlserve export"):
        Manifest.from_metadata({})
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_metadata({METADATA_KEY: "{nope"})
    with pytest.raises(ManifestError, match="malformed"):
        Manifest.from_metadata({METADATA_KEY: json.dumps({"name": "x"})})


def test_check_graph_accepts_the_matching_signature():
    make().check_graph(
        inputs=[("images", ["N", 3, 224, 224], "uint8")],
        outputs=[("probabilities", ["N", 3]), ("embedding", ["N", 1280])],
    )


@pytest.mark.parametrize(
    "inputs, outputs, message",
    [
        ([("pixels", ["N", 3, 224, 224], "uint8")], [("probabilities", ["N", 3]), ("embedding", ["N", 8])], "no input"),
        (
            [("images", ["N", 3, 224, 224], "float32")],
            [("probabilities", ["N", 3]), ("embedding", ["N", 8])],
            "float32",
        ),
        ([("images", ["N", 3, 96, 96], "uint8")], [("probabilities", ["N", 3]), ("embedding", ["N", 8])], "shape"),
        ([("images", [1, 3, 224, 224], "uint8")], [("probabilities", [1, 3]), ("embedding", [1, 8])], "fixed batch"),
        ([("images", ["N", 3, 224, 224], "uint8")], [("probabilities", ["N", 4]), ("embedding", ["N", 8])], "3 labels"),
        ([("images", ["N", 3, 224, 224], "uint8")], [("probabilities", ["N", 3])], "no output 'embedding'"),
    ],
)
def test_check_graph_refuses_a_mismatch(inputs, outputs, message):
    with pytest.raises(ManifestError, match=message):
        make().check_graph(inputs=inputs, outputs=outputs)


def test_calibration_round_trips_and_is_optional():
    from tlserve.manifest import Calibration

    calibrated = make(calibration=Calibration(temperature=1.7, split="test", ece_before=0.08, ece_after=0.01))
    data = json.loads(calibrated.to_json())
    assert data["calibration"]["temperature"] == 1.7 and data["calibration"]["method"] == "temperature"
    assert data["schema_version"] == 1  # an optional field: old readers of schema 1 files are unaffected
    assert Manifest.from_metadata({METADATA_KEY: calibrated.to_json()}) == calibrated
    plain = make()
    assert plain.calibration is None and "calibration" not in json.loads(plain.to_json())


def test_a_manifest_written_before_calibration_existed_still_loads():
    old = json.loads(make().to_json())
    assert "calibration" not in old
    assert Manifest.from_dict(old).calibration is None
    assert Manifest.from_dict({**old, "calibration": None}) == make()


@pytest.mark.parametrize(
    "calibration, message",
    [({"temperature": 0}, "temperature"), ({"temperature": 2, "method": "platt"}, "method"), ({}, "malformed")],
)
def test_a_malformed_calibration_is_refused(calibration, message):
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict({**json.loads(make().to_json()), "calibration": calibration})


def baseline_data(**changes):
    base = {
        "images": 200,
        "quantiles": {"0.05": 0.41, "0.1": 0.52, "0.5": 0.93, "0.9": 0.999},
        "class_share": {"cat": 0.5, "dog": 0.3, "bird": 0.2},
        "split": "pets (val)",
    }
    base.update(changes)
    return base


def test_baseline_round_trips_and_is_optional():
    from tlserve.manifest import Baseline

    watched = make(baseline=Baseline(**baseline_data()))
    data = json.loads(watched.to_json())
    assert data["baseline"]["quantiles"]["0.1"] == 0.52 and data["baseline"]["class_share"]["dog"] == 0.3
    assert data["schema_version"] == 1  # an optional field, like calibration
    assert Manifest.from_metadata({METADATA_KEY: watched.to_json()}) == watched
    assert "baseline" not in json.loads(make().to_json())


def test_a_manifest_written_before_the_baseline_existed_still_loads():
    old = json.loads(make().to_json())
    assert Manifest.from_dict(old).baseline is None
    assert Manifest.from_dict({**old, "baseline": None}) == make()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"quantiles": {"0.1": 0.9, "0.5": 0.5}}, "grow with the quantile"),
        ({"quantiles": {"0.1": 1.5}}, r"lie in \[0, 1\]"),
        ({"quantiles": {"median": 0.5}}, "quantile names"),
        ({"quantiles": {"1.5": 0.5}}, "quantile names"),
        ({"quantiles": {}}, "must not be empty"),
        ({"class_share": {"cat": 0.5, "dog": 0.3, "bird": 0.3}}, "sum to 1"),
        ({"class_share": {"cat": 0.5, "dog": 0.5}}, "every label"),
        ({"class_share": {"cat": 0.5, "dog": 0.3, "bird": 0.1, "fish": 0.1}}, "every label"),
        ({"images": 0}, "positive integer"),
        ({"quantiles": ["0.1"]}, "malformed"),
        ({"unknown": 1}, "malformed"),
    ],
)
def test_a_malformed_baseline_is_refused(changes, message):
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict({**json.loads(make().to_json()), "baseline": baseline_data(**changes)})
