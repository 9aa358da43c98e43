"""Settings from flags and environment; the error hierarchy's status mapping."""

from __future__ import annotations

import argparse
import logging

import grpc
import pytest

from tlserve.server import errors
from tlserve.server.settings import Settings, VersionPolicy, add_arguments


def parse(argv, env=None) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser, env=env or {})
    return Settings.from_args(parser.parse_args(argv))


def test_defaults_match_the_server_contract():
    s = parse([])
    assert (s.repository, s.host, s.port, s.metrics_port, s.device) == ("models", "0.0.0.0", 50051, 8080, "auto")
    assert (s.max_batch_size, s.max_queue_delay_ms, s.max_queue_size) == (32, 2.0, 256)
    assert (s.max_message_bytes, s.max_image_bytes, s.max_pixels, s.max_images) == (16777216, 8388608, 40000000, 64)
    assert s.version_policy == VersionPolicy("latest", 1) and s.drain_seconds == 10 and not s.require_gpu


def test_environment_sets_defaults_and_flags_win():
    env = {
        "TLSERVE_PORT": "6000",
        "TLSERVE_DEVICE": "cuda:1",
        "TLSERVE_REQUIRE_GPU": "true",
        "TLSERVE_VERSION_POLICY": "specific:1,3",
        "TLSERVE_MAX_QUEUE_DELAY_MS": "0.5",
    }
    s = parse(["--port", "7000"], env)
    assert s.port == 7000 and s.device == "cuda:1" and s.require_gpu and s.max_queue_delay == 0.0005
    assert s.version_policy.select(["1", "2", "3", "10"]) == ["3", "1"]


@pytest.mark.parametrize("bad", ["--device=tpu", "--version-policy=newest", "--max-batch-size=0"])
def test_bad_values_are_refused(bad):
    with pytest.raises(ValueError):
        parse([bad])


def test_version_policy_orders_numerically():
    versions = ["1", "2", "10", "9"]
    assert VersionPolicy.parse("latest:2").select(versions) == ["10", "9"]
    assert VersionPolicy.parse("all").select(versions) == ["10", "9", "2", "1"]


@pytest.mark.parametrize(
    "cls,code",
    [
        (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound, grpc.StatusCode.NOT_FOUND),
        (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ServingError, grpc.StatusCode.INTERNAL),
    ],
)
def test_serving_errors_map_to_their_status_with_their_message(cls, code):
    assert errors.to_status(cls("image 3: broken")) == (code, "image 3: broken")


def test_unknown_errors_are_logged_and_answered_generically(caplog):
    try:
        raise KeyError("secret internals /etc/passwd")
    except KeyError as exc:
        with caplog.at_level(logging.ERROR):
            code, message = errors.to_status(exc)
    assert (code, message) == (grpc.StatusCode.INTERNAL, "internal error")
    assert "secret internals" in caplog.text and "Traceback" in caplog.text
