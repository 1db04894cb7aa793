"""Layer weights against values computed by hand from the specification (docs/method.md)."""

import math

import pytest

from lata.weightings import layer_weights
from lata.weightings.rank import dropped_count, rank_positions

SIMS = [0.9, 0.1, 0.5, 0.7]  # ranks p: layer0 -> 0, layer3 -> 1, layer2 -> 2, layer1 -> 3


def test_rank_positions_descending_with_index_tiebreak():
    assert rank_positions(SIMS) == [0, 3, 2, 1]
    assert rank_positions([0.5, 0.5, 0.9, 0.5]) == [1, 2, 0, 3]


def test_dropped_count_rounds_half_up():
    assert dropped_count(0.5, 4) == 2
    assert dropped_count(0.5, 5) == 3  # 2.5 -> 3 (Python's round would give 2)
    assert dropped_count(0.9, 32) == 29  # 28.8
    assert dropped_count(0.0, 32) == 0


def test_uniform_and_threshold():
    assert layer_weights(SIMS, "uniform") == [1.0, 1.0, 1.0, 1.0]
    assert layer_weights(SIMS, "threshold", threshold=0.7) == [0.0, 1.0, 1.0, 1.0]  # s > t strictly
    assert layer_weights(SIMS, "threshold", threshold=0.95) == [1.0, 1.0, 1.0, 1.0]


def test_linear_rank_by_hand():
    # D = 2: layers at p=0,1 (layers 0 and 3) dropped; p=2 -> 1/2, p=3 -> 2/2
    assert layer_weights(SIMS, "linear_rank", drop=0.5) == [0.0, 1.0, 0.5, 0.0]
    # D = 0: p=0..3 -> 1/4, 2/4, 3/4, 4/4
    assert layer_weights(SIMS, "linear_rank", drop=0.0) == [0.25, 1.0, 0.75, 0.5]


def test_log_rank_by_hand():
    w = layer_weights(SIMS, "log_rank", drop=0.5)
    assert w[0] == 0.0 and w[3] == 0.0
    assert w[2] == pytest.approx(math.log(2) / math.log(3))
    assert w[1] == pytest.approx(1.0)
    w = layer_weights(SIMS, "log_rank", drop=0.25)  # D = 1, L - D = 3
    assert w == pytest.approx([0.0, 1.0, math.log(3) / math.log(4), math.log(2) / math.log(4)])


def test_normalize_mean_rescales_to_mean_one():
    w = layer_weights(SIMS, "linear_rank", drop=0.5, normalize="mean")  # mean of [0,1,.5,0] = .375
    assert w == pytest.approx([0.0, 1 / 0.375, 0.5 / 0.375, 0.0])
    assert sum(w) / len(w) == pytest.approx(1.0)


def test_explicit_weights_and_their_length():
    assert layer_weights(SIMS, "explicit", weights=[0, 0.5, 1, 2]) == [0.0, 0.5, 1.0, 2.0]
    with pytest.raises(ValueError, match="expected 4, got 3"):
        layer_weights(SIMS, "explicit", weights=[1, 1, 1])


def test_all_zero_weights_cannot_be_mean_normalized():
    with pytest.raises(ValueError, match="every layer weight is 0"):
        layer_weights(SIMS, "threshold", threshold=0.0, normalize="mean")


def test_drop_everything_gives_zero_weights():
    assert layer_weights(SIMS, "linear_rank", drop=0.9) == [0.0, 0.0, 0.0, 0.0]  # D = round(3.6) = 4
