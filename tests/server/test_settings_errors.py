"""Settings from flags and environment; the error hierarchy's status mapping."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tlserve.server import errors
from tlserve.server.cpus import available_cpus
from tlserve.server.preprocess import ImageLimits
from tlserve.server.repository import RepositoryOptions
from tlserve.server.settings import Settings, VersionPolicy, add_arguments, setting, setting_specs


def parse(argv, env=None, cls=Settings):
    parser = argparse.ArgumentParser()
    add_arguments(parser, env=env or {}, cls=cls)
    args = parser.parse_args(argv)
    return Settings.from_args(args) if cls is Settings else cls(**vars(args))


@dataclass(frozen=True)
class Extra:
    """Fields written the way new settings are added: ``name: type = setting(default, "help")``."""

    tls_cert: str = setting("", "PEM certificate chain; unset: plaintext")
    audit: bool = setting(False, "log every call")
    budget: float = setting(1.5, "seconds")
    mode: str = setting("fast", "how", choices=("fast", "safe"), env="EXTRA_MODE")


def test_defaults_match_the_server_contract():
    s = parse([])
    assert (s.repository, s.host, s.port, s.metrics_port, s.device) == ("models", "0.0.0.0", 50051, 8080, "auto")
    assert (s.max_batch_size, s.max_queue_delay_ms, s.max_queue_size) == (32, 2.0, 256)
    assert (s.max_message_bytes, s.max_image_bytes, s.max_pixels, s.max_images) == (4194304, 4194304, 16000000, 64)
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
    with pytest.raises(ValueError, match=bad.split("=")[0].lstrip("-").replace("-", ".")):
        parse([bad])


@pytest.mark.parametrize(
    "text,on",
    [("1", True), ("TRUE", True), ("yes", True), ("on", True)]
    + [("0", False), ("false", False), ("no", False), ("off", False), ("", False)],
)
def test_a_switch_reads_yes_and_no_words_from_the_environment(text, on):
    assert parse([], {"TLSERVE_REQUIRE_GPU": text}).require_gpu is on
    assert parse(["--require-gpu"], {"TLSERVE_REQUIRE_GPU": text}).require_gpu


@pytest.mark.parametrize(
    "env,names",
    [
        ({"TLSERVE_PORT": "50o51"}, ("--port", "TLSERVE_PORT", "'50o51'")),
        ({"TLSERVE_REQUIRE_GPU": "maybe"}, ("--require-gpu", "TLSERVE_REQUIRE_GPU", "'maybe'")),
        ({"TLSERVE_MAX_QUEUE_DELAY_MS": "2ms"}, ("--max-queue-delay-ms", "TLSERVE_MAX_QUEUE_DELAY_MS", "'2ms'")),
    ],
)
def test_a_bad_environment_value_is_refused_naming_flag_and_variable(env, names, capsys):
    with pytest.raises(SystemExit) as exit:
        parse([], env)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert all(name in err for name in names), err


def test_a_bad_flag_value_is_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        parse(["--max-images", "many"], {"TLSERVE_PORT": "6000"})
    err = capsys.readouterr().err
    assert "--max-images" in err and "'many'" in err and "TLSERVE" not in err


def test_new_fields_need_only_a_default_and_a_help_text(capsys):
    assert parse([], cls=Extra) == Extra()
    env = {
        "TLSERVE_TLS_CERT": "/certs/chain.pem",
        "TLSERVE_AUDIT": "on",
        "TLSERVE_BUDGET": "0.25",
        "EXTRA_MODE": "safe",
    }
    assert parse([], env, cls=Extra) == Extra("/certs/chain.pem", True, 0.25, "safe")
    assert parse(["--tls-cert", "x.pem", "--budget", "3", "--mode", "fast"], env, cls=Extra) == Extra(
        "x.pem", True, 3.0, "fast"
    )
    with pytest.raises(SystemExit):
        parse([], {"EXTRA_MODE": "reckless"}, cls=Extra)
    assert "EXTRA_MODE" in capsys.readouterr().err
    specs = {spec.name: spec for spec in setting_specs(Extra)}
    assert specs["tls_cert"].default_text == "unset" and specs["audit"].default_text == "off"
    assert (specs["mode"].env, specs["mode"].flag) == ("EXTRA_MODE", "--mode")


def test_help_shows_each_default_and_variable_and_the_environment_value_in_use():
    parser = argparse.ArgumentParser()
    add_arguments(parser, env={"TLSERVE_MAX_PIXELS": "1000"})
    text = " ".join(parser.format_help().split())
    assert (
        "gRPC port (task API, OIP, health, reflection); 0 picks a free port (default: 50051; env TLSERVE_PORT)" in text
    )
    assert "(default: '1000'; set by TLSERVE_MAX_PIXELS)" in text
    assert "--decode-threads" in text and "`" not in text


def test_every_option_comes_from_its_setting():
    s = Settings(
        repository="/srv/models",
        device="cuda:1",
        require_gpu=True,
        intra_op_threads=3,
        inter_op_threads=5,
        max_batch_size=7,
        max_queue_delay_ms=4.0,
        max_queue_size=11,
        max_queue_bytes=23,
        version_policy="all",
        drain_seconds=13.0,
        max_image_bytes=17,
        max_pixels=19,
        max_request_pixels=29,
    )
    repo = RepositoryOptions.from_settings(s)
    assert (repo.root, repo.policy, repo.drain_seconds) == (Path("/srv/models"), VersionPolicy("all"), 13.0)
    runtime, batching = repo.load.runtime, repo.load.batching
    assert (runtime.device, runtime.require_gpu, runtime.intra_op_threads, runtime.inter_op_threads) == (
        "cuda:1",
        True,
        3,
        5,
    )
    assert (batching.max_batch_size, batching.max_queue_delay, batching.max_queue_size) == (7, 0.004, 11)
    assert batching.max_queue_bytes == 23
    assert ImageLimits.from_settings(s) == ImageLimits(max_image_bytes=17, max_pixels=19, max_request_pixels=29)
    assert RepositoryOptions.from_settings(Settings()).load.runtime.intra_op_threads == available_cpus()


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
