"""The gain-signal yardstick (fgrpo.gain_signal): pairs of (gain, the owner's held-out change), correlations."""

import math

import pytest

from fgrpo.gain_signal import correlation, gain_pairs, gain_signal, ranks


def rows_of(accuracies: list[float], gains: list[float | None], task: str = "t") -> list[dict]:
    """Eval rows for rounds 0..R (content accuracy on ``task``) and one client row per round 1..R."""
    rows = [{"round": r, "kind": "eval", f"content_accuracy/{task}": a} for r, a in enumerate(accuracies)]
    rows += [{"round": r, "kind": "client", "task": task, "gain": g} for r, g in enumerate(gains, start=1)]
    return rows


def test_pairs_take_the_change_the_round_produced_on_the_owners_task():
    rows = rows_of([0.5, 0.6, 0.55, 0.7], [1.0, -0.5, None])
    assert gain_pairs(rows) == [(1.0, pytest.approx(0.1)), (-0.5, pytest.approx(-0.05))]  # no gain: no pair
    rows.append({"round": 2, "kind": "client", "task": "mixture of 3 tasks", "gain": 2.0})  # not evaluated
    rows.append({"round": 5, "kind": "client", "task": "t", "gain": 2.0})  # no evaluation in rounds 4 and 5
    assert len(gain_pairs(rows)) == 2


def test_ranks_share_ties_and_the_correlations_see_order_and_noise():
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    signal = gain_signal([(g, 0.01 * g ** 3) for g in (-2.0, -1.0, 0.5, 1.0, 3.0)])  # monotone, not linear
    assert signal.spearman == pytest.approx(1.0) and 0.8 < signal.pearson < 1.0 and signal.sign_agreement == 1.0
    flipped = gain_signal([(g, -0.01 * g) for g in (-2.0, -1.0, 0.5, 1.0, 3.0)])
    assert flipped.pearson == pytest.approx(-1.0) and flipped.sign_agreement == 0.0
    assert math.isnan(correlation([1.0, 1.0, 1.0], [0.1, 0.2, 0.3]))  # a constant gain says nothing
    assert gain_signal([]).pairs == 0 and math.isnan(gain_signal([]).sign_agreement)
