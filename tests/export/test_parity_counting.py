"""How verification counts top-1 flips: once per image, and near-ties excused only within the tie margin."""

import numpy as np
import onnx
from onnx import TensorProto, helper

from tlserve.export.verify import compare, cpu_session


def identity_graph(path):
    """A real ONNX graph whose probabilities and embedding are its input, so the test picks ORT's outputs."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("probabilities", "embedding")]
    nodes = [helper.make_node("Identity", ["x"], [n]) for n in ("probabilities", "embedding")]
    model = helper.make_model(
        helper.make_graph(nodes, "identity", [x], outs), opset_imports=[helper.make_opsetid("", 17)], ir_version=9
    )
    onnx.save(model, str(path))
    return cpu_session(path)


def test_a_flip_counts_once_and_a_near_tie_is_excused(tmp_path):
    session = identity_graph(tmp_path / "id.onnx")
    served = np.tile(np.array([[0.8, 0.1, 0.1]], np.float32), (8, 1))
    served[0] = [0.495, 0.505, 0.0]  # reference prefers class 0 by 0.01: a tie at margin 0.02
    served[1] = [0.30, 0.70, 0.0]  # reference prefers class 0 by 0.4: a real disagreement
    reference = served.copy()
    reference[0] = [0.505, 0.495, 0.0]
    reference[1] = [0.70, 0.30, 0.0]
    parity = compare(session, served, (reference, reference), batch_sizes=(1, 5, 16), tie_margin=0.02)
    assert parity.top1_agreement == 1 - 2 / 8  # two images, each flipped at all three batch sizes, count once
    assert parity.tie_flips == 1
    assert parity.decisive_agreement == 1 - 1 / 8
    strict = compare(session, served, (reference, reference), batch_sizes=(1, 5, 16))
    assert strict.tie_flips == 0 and strict.decisive_agreement == strict.top1_agreement
