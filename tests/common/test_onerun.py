"""The one-run ε lower bound of Steinke, Nasr & Jagielski (2023): values and guarantees."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fedrec.client.audit.onerun import audit_scores, epsilon_lower_bound, p_value
from fedrec.common.errors import PrivacyError


def test_p_value_without_delta_is_the_binomial_tail() -> None:
    eps = 1.0
    q = math.exp(eps) / (1 + math.exp(eps))

    tail = sum(math.comb(20, k) * q**k * (1 - q) ** (20 - k) for k in range(15, 21))  # P[Bin(20, q) >= 15]

    assert p_value(m=100, r=20, v=15, epsilon=eps, delta=0.0) == pytest.approx(tail)


def test_perfect_guesses_give_the_closed_form_bound() -> None:
    # all r guesses right, δ = 0: the bound solves q^r = 0.05, q = e^ε / (1 + e^ε)
    r = 20
    q = 0.05 ** (1 / r)
    expected = math.log(q / (1 - q))

    bound = epsilon_lower_bound(m=200, r=r, v=r, delta=0.0)

    assert bound == pytest.approx(expected, rel=1e-6)


def test_chance_level_guesses_give_no_bound() -> None:
    assert epsilon_lower_bound(m=200, r=40, v=20, delta=1e-5) == 0.0


def test_delta_only_weakens_the_bound() -> None:
    assert epsilon_lower_bound(m=1000, r=100, v=90, delta=1e-3) < epsilon_lower_bound(m=1000, r=100, v=90,
                                                                                         delta=0.0)


def test_bound_holds_at_95_percent_for_randomized_response() -> None:
    """Under ε-DP randomized response the bound exceeds ε in at most ~5 % of trials."""
    eps, m, trials = 1.0, 200, 200
    rng = np.random.default_rng(0)
    above = 0
    for _ in range(trials):
        included = rng.random(m) < 0.5
        keep = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))  # ε-DP: report the truth or flip it
        scores = np.where(keep == included, 1.0, 0.0) + rng.normal(0, 1e-3, m)
        result = audit_scores(scores, included, k_plus=m // 2, k_minus=m // 2, delta=0.0)
        above += result.epsilon_lower_bound > eps
    assert above / trials <= 0.1


def test_guesses_are_counted_from_the_top_and_bottom_scores() -> None:
    scores = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    included = [True, True, False, True, False, False]

    result = audit_scores(scores, included, k_plus=2, k_minus=2, delta=0.0)

    assert (result.guesses, result.correct) == (4, 4)


def test_bad_counts_are_refused() -> None:
    with pytest.raises(PrivacyError):
        epsilon_lower_bound(m=10, r=20, v=5, delta=0.0)
    with pytest.raises(PrivacyError):
        audit_scores([1.0, 2.0], [True], k_plus=1, k_minus=0, delta=0.0)
