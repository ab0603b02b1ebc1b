"""Ranking metrics against hand-computed values and a naive per-user reference."""

import math

import numpy as np
import pytest
from fedrec.common import metrics
from fedrec.common.metrics import evaluate_scores, rank_of_targets, ranking_metrics


def test_ranks_exclusion_and_pessimistic_ties() -> None:
    scores = np.array([
        [0.9, 0.8, 0.7, 0.6],   # target 2: items 0,1 above -> rank 3
        [0.9, 0.8, 0.7, 0.6],   # target 2, items 0,1 seen (excluded) -> rank 1
        [0.5, 0.5, 0.5, 0.1],   # target 0 tied with 1 and 2 -> pessimistic rank 3
        [0.1, 0.2, 0.3, 0.4],   # target 3 listed in exclude: never excluded -> rank 1
        [0.0, 0.0, 0.0, 0.0],   # all tied, item 1 seen -> worst of the 3 left: rank 3
    ])
    targets = np.array([2, 2, 0, 3, 0])
    exclude = [[], [0, 1], [], [3, 0], (1,)]

    ranks = rank_of_targets(scores, targets, exclude)

    assert ranks.tolist() == [3, 1, 3, 1, 3]


def test_excluded_items_do_not_count_against_a_minus_inf_target() -> None:
    scores = np.array([[-np.inf, 0.5, -np.inf, 0.3]])

    ranks = rank_of_targets(scores, np.array([0]), [[1, 2]])

    assert ranks.tolist() == [2]  # only item 3 is left to beat it (a tie at -inf would make 3)


def test_golden_hr_ndcg_mrr() -> None:
    ranks = np.array([1, 3, 11, 2])

    m = ranking_metrics(ranks, ks=(10, 2))

    assert m["hr@10"] == pytest.approx(3 / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 0 + 1 / math.log2(3)) / 4)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 2) / 4)
    assert m["hr@2"] == pytest.approx(2 / 4)
    assert m["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert m["mrr@2"] == pytest.approx((1 + 1 / 2) / 4)


def test_evaluate_scores_end_to_end_with_k_larger_than_catalogue() -> None:
    scores = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    targets = np.array([0, 2])

    m = evaluate_scores(scores, targets, exclude=[[2], []], ks=(10, 1))

    # ranks: user 0 -> 2 (item 2 excluded, item 1 above), user 1 -> 3
    assert m["hr@10"] == 1.0
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 2)
    assert m["hr@1"] == m["ndcg@1"] == m["mrr@1"] == 0.0


def test_chunked_ranks_match_a_naive_reference() -> None:
    rng = np.random.default_rng(0)
    num_users, num_items = 2 * metrics._CHUNK_USERS + 37, 40  # crosses two chunk boundaries
    scores = rng.integers(0, 5, size=(num_users, num_items)).astype(float)  # many ties
    targets = rng.integers(0, num_items, size=num_users)
    exclude = [rng.choice(num_items, size=rng.integers(0, 10), replace=False).tolist() for _ in targets]

    ranks = rank_of_targets(scores, targets, exclude)

    expected = []
    for u, t in enumerate(targets):
        others = [i for i in range(num_items) if i != t and i not in exclude[u]]
        expected.append(1 + sum(scores[u, i] >= scores[u, t] for i in others))
    assert ranks.tolist() == expected


@pytest.mark.parametrize(
    ("scores", "targets", "exclude", "needle"),
    [
        ([[np.nan, 1.0]], [0], None, "NaN"),
        (np.zeros((2, 3)), [0], None, "do not match"),
        ([[0.1, 0.2]], [2], None, r"targets must lie in \[0, 2\)"),
        ([[0.1, 0.2]], [-1], None, "targets must lie"),
        ([[0.1, 0.2]], [0.0], None, "integer item indices"),
        ([[0.1, 0.2]], [0], [[1], [0]], "exclude has 2 rows for 1 users"),
        ([[0.1, 0.2]], [0], [[-1]], r"exclude\[0\] must hold"),
        ([[0.1, 0.2]], [0], [[5]], r"exclude\[0\] must hold"),
    ],
)
def test_bad_rank_inputs_raise(scores: list, targets: list, exclude: list | None, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        rank_of_targets(np.array(scores), np.array(targets), exclude)


def test_bad_metric_inputs_raise() -> None:
    with pytest.raises(ValueError, match="no users"):
        ranking_metrics(np.array([]))
    with pytest.raises(ValueError, match="1-based"):
        ranking_metrics(np.array([0, 1]))
    with pytest.raises(ValueError, match="K=0"):
        ranking_metrics(np.array([1, 2]), ks=(0,))
