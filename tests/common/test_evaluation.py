"""Choosing the blend weight on validation users: a lead inside the user-sampling noise is not taken."""

import numpy as np
import pytest
from fedrec.common.evaluation import BLEND_WEIGHTS, EvalUsers, choose_weight, lead_z
from fedrec.common.metrics import per_user_metrics, ranking_metrics


def _users(n: int, num_items: int, rng: np.random.Generator) -> EvalUsers:
    targets = rng.integers(0, num_items, n)
    return EvalUsers(tuple(str(u) for u in range(n)), tuple(() for _ in range(n)), targets)


def _cf_at_rank(who: EvalUsers, num_items: int, rank: int) -> np.ndarray:
    """CF scores that put every user's target at `rank` (1-based), the other items in index order."""
    scores = np.tile(-np.arange(num_items, dtype=np.float64), (len(who.targets), 1))
    for u, t in enumerate(who.targets):
        others = [i for i in range(num_items) if i != t]
        order = others[:rank - 1] + [int(t)] + others[rank - 1:]
        scores[u, order] = -np.arange(num_items, dtype=np.float64)
    return scores


def test_per_user_metrics_average_to_ranking_metrics() -> None:
    ranks = np.array([1, 3, 11, 2, 40])
    per_user = per_user_metrics(ranks, ks=(5, 10))
    assert per_user["ndcg@10"][1] == 1 / np.log2(4)
    assert {k: float(v.mean()) for k, v in per_user.items()} == ranking_metrics(ranks, ks=(5, 10))


def test_a_consistent_lead_is_taken() -> None:
    rng = np.random.default_rng(0)
    who = _users(300, 30, rng)
    cf = _cf_at_rank(who, 30, 6)
    llm = np.zeros_like(cf)
    llm[np.arange(300), who.targets] = 1.0  # w = 8 lifts every target to rank 1; w = 0.5 moves none
    choice = choose_weight(cf, llm, who, weights=(0.0, 0.5, 8.0), key="ndcg@10")
    assert choice.weight == 8.0
    assert choice.leads[0] == 0.0 and choice.leads[2] > 10 * choice.standard_errors[2]


def test_a_lead_inside_the_noise_is_not_taken() -> None:
    rng = np.random.default_rng(1)
    who = _users(400, 30, rng)
    cf = _cf_at_rank(who, 30, 6)
    llm = np.zeros_like(cf)
    # 10 users' targets lifted from rank 6 to 1 (+0.64 NDCG each), 10 pushed out of the top 10
    # (−0.36 each): mean lead +0.007, standard error 0.006 — positive, but inside the noise
    up = rng.random(400) < 0.5
    lifted = np.flatnonzero(up)[:10]  # 10 users helped
    pushed = np.flatnonzero(~up)[:10]  # 10 users hurt
    llm[lifted, who.targets[lifted]] = 100.0
    llm[pushed, who.targets[pushed]] = -100.0
    choice = choose_weight(cf, llm, who, weights=(0.0, 1.0), key="ndcg@10")
    assert choice.leads[1] > 0  # the best mean on validation ...
    assert choice.weight == 0.0  # ... but not outside z = 1.64 standard errors: CF alone
    assert 0 < choice.leads[1] < lead_z((0.0, 1.0)) * choice.standard_errors[1]


def test_the_threshold_grows_with_the_weights_tried() -> None:
    # one-sided 5 %, Bonferroni over the weights > 0 (w = 0 is the control, not a comparison)
    assert lead_z((0.0, 1.0)) == pytest.approx(1.645, abs=1e-3)
    assert lead_z(BLEND_WEIGHTS) == pytest.approx(2.394, abs=1e-3)


def test_without_an_llm_cf_alone() -> None:
    rng = np.random.default_rng(2)
    who = _users(50, 20, rng)
    choice = choose_weight(_cf_at_rank(who, 20, 3), None, who, weights=(0.0, 1.0), key="ndcg@10")
    assert choice.weight == 0.0
