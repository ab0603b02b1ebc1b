"""The four accountants agree on fixed mechanisms, and match the Gaussian mechanism's exact ε."""

from __future__ import annotations

import math

import pytest
from fedrec.common.privacy import accountants
from fedrec.common.privacy.analysis import MechanismStep
from scipy import optimize, stats

SUBSAMPLED = [MechanismStep(noise_multiplier=1.1, sample_rate=0.1, steps=100)]  # σ, q, steps; δ = 1e-5 below

# Golden values (dp-accounting 0.6.0, Opacus 1.6.0), for (σ=1.1, q=0.1, 100 steps, δ=1e-5)
GOLDEN = {accountants.OPACUS_RDP: 6.6137, accountants.OPACUS_PRV: 5.9230,
          accountants.DPACC_RDP: 6.6208, accountants.DPACC_PLD: 5.9127}


def exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """ε of one Gaussian mechanism (sensitivity 1) from Balle & Wang (2018), Theorem 8."""
    def delta_of(eps: float) -> float:
        return stats.norm.cdf(-eps * sigma + 1 / (2 * sigma)) - math.exp(eps) * stats.norm.cdf(
            -eps * sigma - 1 / (2 * sigma))
    return optimize.brentq(lambda e: delta_of(e) - delta, 1e-9, 100)


def test_golden_values_for_a_fixed_subsampled_mechanism() -> None:
    eps = accountants.epsilons(SUBSAMPLED, 1e-5)

    for name, value in GOLDEN.items():
        assert eps[name] == pytest.approx(value, rel=2e-3), name
    # the two RDP implementations agree, and so do the two near-exact ones (PRV, PLD)
    assert eps[accountants.OPACUS_RDP] == pytest.approx(eps[accountants.DPACC_RDP], rel=5e-3)
    assert eps[accountants.OPACUS_PRV] == pytest.approx(eps[accountants.DPACC_PLD], rel=1e-2)
    assert eps[accountants.DPACC_PLD] < eps[accountants.DPACC_RDP]  # RDP's conversion is looser


def test_near_exact_accountants_match_the_analytic_gaussian_mechanism() -> None:
    exact = exact_gaussian_epsilon(1.158, 1e-5)

    eps = accountants.epsilons([MechanismStep(noise_multiplier=1.158, sample_rate=1.0, steps=1)], 1e-5)

    assert eps[accountants.DPACC_PLD] == pytest.approx(exact, rel=5e-3)
    assert eps[accountants.OPACUS_PRV] == pytest.approx(exact, rel=1e-2)
    assert eps[accountants.OPACUS_RDP] >= exact and eps[accountants.DPACC_RDP] >= exact  # upper bounds


def test_running_epsilons_compose_in_order() -> None:
    history = [MechanismStep(noise_multiplier=1.158, sample_rate=1.0, steps=1), MechanismStep(noise_multiplier=1.0, sample_rate=0.4, steps=2), MechanismStep(noise_multiplier=1.0, sample_rate=0.4, steps=2)]

    running = accountants.running_epsilons(history, 1e-5)

    for name, values in running.items():
        assert len(values) == 3 and values == sorted(values), name
        assert values[-1] == pytest.approx(accountants.epsilons(history, 1e-5)[name], rel=1e-6)


def test_zero_noise_is_infinite_epsilon() -> None:
    eps = accountants.epsilons([MechanismStep(noise_multiplier=1.0, sample_rate=0.5, steps=1), MechanismStep(noise_multiplier=0.0, sample_rate=0.5, steps=1)], 1e-5)

    assert all(math.isinf(v) for v in eps.values())
