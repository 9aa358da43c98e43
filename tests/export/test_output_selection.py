"""`--outputs`: which graph outputs an export writes, checked before any work."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.torch
pytest.importorskip("torch")


def test_selection_is_in_graph_order_and_requires_probabilities():
    from tlserve.export.graph import output_selection

    assert output_selection("probabilities") == ("probabilities",)
    assert output_selection("logits,probabilities") == ("probabilities", "logits")
    assert output_selection(["embedding", "probabilities"]) == ("probabilities", "embedding")
    with pytest.raises(ValueError, match="must include 'probabilities'"):
        output_selection("embedding")
    with pytest.raises(ValueError, match="unknown output 'scores'"):
        output_selection("probabilities,scores")
    with pytest.raises(ValueError, match="must not repeat"):
        output_selection("probabilities,probabilities")


def test_logits_flag_adds_to_the_chosen_outputs_and_the_manifest_follows(fashion_checkpoint):
    from tlserve.export.api import ExportOptions, graph_outputs, serving_manifest
    from tlserve.trainer import checkpoint

    manifest = checkpoint.load(fashion_checkpoint).manifest
    assert graph_outputs(ExportOptions()) == ("probabilities", "embedding")
    assert graph_outputs(ExportOptions(outputs="probabilities", logits=True)) == ("probabilities", "logits")
    only = serving_manifest(manifest, ExportOptions(outputs="probabilities")).outputs
    assert (only.probabilities, only.embedding, only.logits) == ("probabilities", None, None)
    default = serving_manifest(manifest, ExportOptions()).outputs
    assert (default.embedding, default.logits) == ("embedding", None)
