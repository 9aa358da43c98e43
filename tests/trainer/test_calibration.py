"""Temperature scaling: ECE on hand-made cases, the fit recovering a known temperature, top-1 never moving."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from tlserve.trainer import calibration as cal  # noqa: E402


def two_class(confidence: float, correct: int, wrong: int) -> tuple[np.ndarray, np.ndarray]:
    """``correct + wrong`` predictions of class 0 at ``confidence``, ``correct`` of them right."""
    probs = np.tile([confidence, 1 - confidence], (correct + wrong, 1))
    return probs, np.array([0] * correct + [1] * wrong)


def test_perfectly_calibrated_predictions_have_zero_ece():
    parts = [two_class(0.6, 6, 4), two_class(0.8, 8, 2), two_class(0.9, 18, 2)]
    probs, targets = np.concatenate([p for p, _ in parts]), np.concatenate([t for _, t in parts])
    assert cal.expected_calibration_error(probs, targets) == pytest.approx(0.0, abs=1e-12)


def test_over_confident_predictions_have_a_large_ece():
    probs, targets = two_class(0.99, 5, 5)  # 99 % sure, right half the time
    assert cal.expected_calibration_error(probs, targets) == pytest.approx(0.49)


def test_ece_weighs_each_bin_by_its_share_of_images():
    over, over_y = two_class(0.95, 10, 10)  # 20 images: confidence 0.95, accuracy 0.5 -> gap 0.45
    under, under_y = two_class(0.55, 20, 0)  # 20 images: confidence 0.55, accuracy 1.0 -> gap 0.45
    right, right_y = two_class(0.75, 30, 10)  # 40 images, calibrated
    probs = np.concatenate([over, under, right])
    targets = np.concatenate([over_y, under_y, right_y])
    assert cal.expected_calibration_error(probs, targets) == pytest.approx(0.25 * 0.45 + 0.25 * 0.45)


def test_reliability_bins_are_equal_width_and_right_closed():
    probs = np.array([[1.0, 0.0], [0.04, 0.96], [0.5, 0.5], [0.51, 0.49]])
    rel = cal.reliability(probs, np.array([0, 1, 0, 1]))
    assert rel.bins == 15 and rel.counts.sum() == 4
    assert rel.counts[14] == 2  # 1.0 and 0.96 share the last bin (14/15, 1]
    assert rel.counts[7] == 2  # 0.5 and 0.51 are in (7/15, 8/15]
    assert rel.accuracy[7] == pytest.approx(0.5) and rel.confidence[7] == pytest.approx(0.505)


def synthetic(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is the true class distribution, and targets drawn from it."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 2.0
    targets = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    return logits, targets


@pytest.mark.parametrize("true_t", [3.0, 0.5])
def test_fit_recovers_a_known_temperature(true_t):
    logits, targets = synthetic(20_000, 10)
    fitted = cal.fit_temperature(logits * true_t, targets)  # over- (T 3) or under-confident (T 0.5) logits
    assert fitted == pytest.approx(true_t, rel=0.05)


def test_calibrated_logits_keep_a_temperature_of_about_one():
    logits, targets = synthetic(20_000, 10, seed=1)
    assert cal.fit_temperature(logits, targets) == pytest.approx(1.0, rel=0.05)


def test_calibrate_lowers_ece_and_nll_and_keeps_top1():
    val, test = synthetic(5_000, 10, seed=2), synthetic(5_000, 10, seed=3)
    report = cal.calibrate({"val": (val[0] * 3, val[1]), "test": (test[0] * 3, test[1])})
    assert report.temperature == pytest.approx(3.0, rel=0.1) and report.shown == "test"
    for name in ("val", "test"):
        f = report.splits[name]
        assert f.ece_before > 0.1 and f.ece_after < 0.03 and f.nll_after < f.nll_before
        assert f.images == 5_000
    logits = test[0] * 3
    expected_top1 = float((logits.argmax(1) == test[1]).double().mean())
    assert report.splits["test"].accuracy == pytest.approx(expected_top1)
    after = cal.scaled_probabilities(logits, report.temperature)
    assert torch.equal(after.argmax(1), logits.argmax(1))
    assert report.after.ece == pytest.approx(report.splits["test"].ece_after)
    entry = report.manifest_entry()
    assert (entry.method, entry.split, entry.bins, entry.temperature) == ("temperature", "test", 15, report.temperature)
    assert entry.ece_after == report.splits["test"].ece_after
    assert set(report.to_dict()["splits"]) == {"val", "test"}


def test_a_validation_set_without_mistakes_gives_a_finite_sharper_temperature():
    logits = torch.eye(3).repeat(20, 1) * 3.0  # every prediction right: the NLL keeps falling as T -> 0
    targets = torch.arange(3).repeat(20)
    fitted = cal.fit_temperature(logits, targets)
    assert cal.T_RANGE[0] <= fitted < 0.5
    assert cal.nll(logits, targets, fitted) < cal.nll(logits, targets)


def test_the_manifest_refuses_a_non_positive_temperature():
    from tlserve.manifest import Calibration, ManifestError

    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ManifestError, match="temperature"):
            Calibration(temperature=bad)
    with pytest.raises(ManifestError, match="method"):
        Calibration(temperature=1.5, method="isotonic")
