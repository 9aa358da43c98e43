"""ONNX Runtime sessions on the exported model: I/O binding path, thread settings, provider choice."""

from __future__ import annotations

import numpy as np
import pytest

from tlserve.server.runtime import CPU, Runtime, RuntimeOptions, requested_providers, session_options
from tlserve.server.settings import Settings


def cpu_options(**settings) -> RuntimeOptions:
    """The server's runtime options for these settings, on the CPU."""
    return RuntimeOptions.from_settings(Settings(device="cpu", **settings))


@pytest.fixture(scope="module")
def model_file(exported_version):
    return exported_version / "model.onnx"


def test_io_binding_gives_the_same_outputs_as_plain_run(model_file):
    plain = Runtime(model_file, cpu_options(intra_op_threads=1))
    bound = Runtime(model_file, cpu_options(intra_op_threads=1).replace(io_binding=True))
    assert not plain.use_io_binding and bound.use_io_binding
    size = [shape for name, shape, _ in plain.inputs][0][-1]
    batch = np.random.default_rng(1).integers(0, 256, (5, 3, size, size), dtype=np.uint8)
    a, b = plain.run("images", batch), bound.run("images", batch)
    assert set(a) == set(b) == set(plain.output_names)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_cpu_device_asks_for_cpu_only_and_reports_no_fallback(model_file):
    assert requested_providers(cpu_options()) == [CPU]
    runtime = Runtime(model_file, cpu_options(intra_op_threads=1, inter_op_threads=1))
    assert runtime.provider == CPU and not runtime.fallback
    assert runtime.inputs[0][2] == "uint8"


def test_spinning_stops_after_each_run_by_default_and_is_on_or_off_when_asked(model_file):
    default = session_options(cpu_options())
    assert default.get_session_config_entry("session.force_spinning_stop") == "1"
    off = cpu_options(ort_spinning="off")
    assert session_options(off).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(off).get_session_config_entry("session.inter_op.allow_spinning") == "0"
    on = cpu_options(ort_spinning="on")
    assert on.spinning == "on" and cpu_options().spinning == "run"
    for options in (on, cpu_options()):
        with pytest.raises(RuntimeError, match="does not have configuration"):  # unset: ORT's default (spinning)
            session_options(options).get_session_config_entry("session.intra_op.allow_spinning")
    with pytest.raises(RuntimeError, match="does not have configuration"):
        session_options(on).get_session_config_entry("session.force_spinning_stop")
    size = Runtime(model_file, cpu_options()).inputs[0][1][-1]
    batch = np.random.default_rng(2).integers(0, 256, (2, 3, size, size), dtype=np.uint8)
    a = Runtime(model_file, cpu_options(intra_op_threads=2)).run("images", batch)
    for other in (on, off):
        b = Runtime(model_file, other.replace(intra_op_threads=2)).run("images", batch)
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-7)
