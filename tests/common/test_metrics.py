"""Ranking metrics against hand-computed values."""

import math

import numpy as np
import pytest
from fedrec.common.metrics import evaluate_scores, rank_of_targets, ranking_metrics


def test_ranks_exclusion_and_pessimistic_ties() -> None:
    scores = np.array([
        [0.9, 0.8, 0.7, 0.6],   # target 2: items 0,1 above -> rank 3
        [0.9, 0.8, 0.7, 0.6],   # target 2, items 0,1 seen (excluded) -> rank 1
        [0.5, 0.5, 0.5, 0.1],   # target 0 tied with 1 and 2 -> pessimistic rank 3
        [0.1, 0.2, 0.3, 0.4],   # target 3 listed in exclude: never excluded -> rank 1
    ])
    targets = np.array([2, 2, 0, 3])
    exclude = [[], [0, 1], [], [3, 0]]

    assert rank_of_targets(scores, targets, exclude).tolist() == [3, 1, 3, 1]


def test_golden_hr_ndcg_mrr() -> None:
    ranks = np.array([1, 3, 11, 2])

    m = ranking_metrics(ranks, ks=(10, 2))

    assert m["hr@10"] == pytest.approx(3 / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 0 + 1 / math.log2(3)) / 4)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 2) / 4)
    assert m["hr@2"] == pytest.approx(2 / 4)
    assert m["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 4)


def test_k_larger_than_catalogue_is_a_hit() -> None:
    m = evaluate_scores(np.array([[0.1, 0.2, 0.3]]), np.array([0]), ks=(10,))
    assert m["hr@10"] == 1.0 and m["mrr@10"] == pytest.approx(1 / 3)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="NaN"):
        rank_of_targets(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="do not match"):
        rank_of_targets(np.zeros((2, 3)), np.array([0]))
    with pytest.raises(ValueError, match="no users"):
        ranking_metrics(np.array([]))
