"""Empirical ε lower bounds from one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

"Privacy Auditing with One (1) Training Run" (arXiv:2305.08846): m canaries are each included
in training independently with probability ½; after training, an auditor scores every canary,
guesses "in" for the k₊ highest scores and "out" for the k₋ lowest (abstaining on the rest) and
counts v correct guesses out of r = k₊ + k₋. Their Theorem 3.1 bounds the chance of that many
correct guesses under (ε, δ)-DP by a binomial tail plus a δ term; the p-value and its inversion
below are the paper's Algorithm 2 (the "p_value_DP_audit" / "get_eps_audit" routine of its
appendix), re-implemented here. Pure maths over ints and floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from fedrec.common.errors import PrivacyError
from scipy import stats

_BISECTION_STEPS = 40


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[≥ v correct out of r guesses] when the training run is (ε, δ)-DP (Theorem 3.1).

    Under ε-DP each guess is right with probability at most q = e^ε/(1 + e^ε), so the count is
    dominated by Binomial(r, q); δ adds at most 2·m·δ·α, α the largest average of the
    binomial's probabilities just below v (the paper's Algorithm 2).
    """
    _check_counts(m=m, r=r, v=v)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise PrivacyError(f"p_value: ε={epsilon} must be >= 0 and δ={delta} in [0, 1]")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += float(stats.binom.pmf(v - i, r, q))  # P[v > Binomial(r, q) >= v - i]
        alpha = max(alpha, total / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε rejected at level 1 - `confidence`: with that confidence the run is not
    (ε', δ)-DP for any ε' below the returned value (0 when nothing can be rejected)."""
    _check_counts(m=m, r=r, v=v)
    if not 0 < confidence < 1:
        raise PrivacyError(f"confidence={confidence} must be in (0, 1)")
    level = 1.0 - confidence
    if r == 0 or p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= level:
        return 0.0
    low, high = 0.0, 1.0  # invariant: p(low) < level <= p(high)
    while p_value(m=m, r=r, v=v, epsilon=high, delta=delta) < level:
        low, high = high, 2 * high
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        if p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) < level:
            low = mid
        else:
            high = mid
    return low


def _check_counts(*, m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise PrivacyError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")


@dataclass(frozen=True)
class GuessResult:
    """The auditor's guesses on the canaries and the bound they give."""

    canaries: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    epsilon_lower_bound: float


def audit_scores(
    scores: Sequence[float] | np.ndarray, included: Sequence[bool], *, k_plus: int, k_minus: int,
    delta: float, confidence: float = 0.95,
) -> GuessResult:
    """Guess "in" for the k₊ highest membership scores and "out" for the k₋ lowest; bound ε.

    k₊ and k₋ must be fixed before looking at which canaries were included (choosing them after
    the fact, or trying several and keeping the best, would void the confidence level).
    """
    s = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(included, dtype=bool)
    if s.shape != truth.shape or s.ndim != 1:
        raise PrivacyError(f"{s.size} scores for {truth.size} canaries; need one score per canary")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > s.size:
        raise PrivacyError(f"k₊={k_plus} and k₋={k_minus} must be >= 0 with k₊ + k₋ <= {s.size} canaries")
    order = np.argsort(-s, kind="stable")  # highest score first
    top, bottom = order[:k_plus], order[s.size - k_minus:] if k_minus else order[:0]
    correct = int(truth[top].sum() + (~truth[bottom]).sum())
    r = k_plus + k_minus
    bound = epsilon_lower_bound(m=int(s.size), r=r, v=correct, delta=delta, confidence=confidence)
    return GuessResult(int(s.size), r, correct, k_plus, k_minus, bound)
