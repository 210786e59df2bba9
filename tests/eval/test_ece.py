"""Self-calibration: confidence from choice log-likelihoods, ECE and the reliability curve, by hand."""

from __future__ import annotations

import math

import pytest

from ptqlab.eval.calibration_error import bin_index, choice_confidence, reliability, task_reliability


def test_confidence_is_the_top_normalized_choice_probability() -> None:
    # probabilities 0.7, 0.2, 0.1 given as unnormalized log-likelihoods (shifted by -5)
    lls = [math.log(0.7) - 5, math.log(0.2) - 5, math.log(0.1) - 5]
    assert choice_confidence(lls) == pytest.approx(0.7)
    assert choice_confidence([-1e4, -2.0]) == pytest.approx(1.0)
    assert choice_confidence([-math.inf, -math.inf]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="finite"):
        choice_confidence([math.nan, -1.0])


def test_bins_are_equal_width_and_closed_on_the_right() -> None:
    assert [bin_index(c) for c in (0.0, 0.05, 0.1, 0.10001, 0.3, 0.55, 0.9, 0.95, 1.0)] == [0, 0, 0, 1, 2, 5, 8, 9, 9]
    assert bin_index(0.5, bins=2) == 0 and bin_index(0.51, bins=2) == 1


def test_ece_equals_a_hand_computation() -> None:
    confidence = [0.95, 0.92, 0.85, 0.65, 0.62, 0.58, 0.55, 0.35]
    correct = [1, 0, 1, 1, 0, 1, 0, 1]
    # bins (0.9, 1]: 0.95, 0.92 -> acc 1/2, conf 0.935; (0.8, 0.9]: 0.85 -> acc 1, conf 0.85;
    # (0.6, 0.7]: 0.65, 0.62 -> acc 1/2, conf 0.635; (0.5, 0.6]: 0.58, 0.55 -> acc 1/2, conf 0.565;
    # (0.3, 0.4]: 0.35 -> acc 1, conf 0.35; = 0.10875 + 0.01875 + 0.03375 + 0.01625 + 0.08125
    hand = (2 / 8 * abs(0.5 - 0.935) + 1 / 8 * abs(1 - 0.85) + 2 / 8 * abs(0.5 - 0.635)
            + 2 / 8 * abs(0.5 - 0.565) + 1 / 8 * abs(1 - 0.35))
    rel = reliability(confidence, correct)
    assert rel.ece == pytest.approx(hand) and rel.ece == pytest.approx(0.25875)
    assert rel.n == 8 and [b.count for b in rel.bins] == [0, 0, 0, 1, 0, 2, 2, 0, 1, 2]
    top = rel.bins[9]
    assert (top.lo, top.hi, top.confidence, top.accuracy) == (pytest.approx(0.9), 1.0, pytest.approx(0.935), 0.5)
    assert rel.bins[0].confidence is None and rel.bins[0].accuracy is None
    assert reliability([0.3, 0.3], [0, 1]).ece == pytest.approx(abs(0.5 - 0.3))
    assert reliability([], []).ece == 0.0


def test_reliability_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2 confidences but 1"):
        reliability([0.5, 0.6], [1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability([1.5], [1])
    with pytest.raises(ValueError, match="0 or 1"):
        reliability([0.5], [0.4])


def test_task_reliability_from_choice_logliks_skips_tasks_not_scored_right_or_wrong() -> None:
    lls = {"mc": [[math.log(0.8), math.log(0.2)], [math.log(0.4), math.log(0.6)]], "mass": [[-1.0, -2.0]]}
    correct = {"mc": [1.0, 0.0], "mass": [0.73]}
    out = task_reliability(lls, correct)
    assert set(out) == {"mc"}
    # confidences 0.8 (right) and 0.6 (wrong), one per bin
    assert out["mc"].ece == pytest.approx(0.5 * abs(1 - 0.8) + 0.5 * abs(0 - 0.6))
    assert out["mc"].to_json()["bins"][7] == {"lo": 0.7, "hi": 0.8, "count": 1, "confidence": pytest.approx(0.8),
                                               "accuracy": 1.0}
