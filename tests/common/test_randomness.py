"""The randomness of DP mechanisms: OS entropy by default, seeded only on request (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest
from fedrec.common.privacy.mechanisms import OS_ENTROPY, SEEDED, MechanismRandom, mechanism_random


def test_secret_draws_are_uniform_gaussian_and_never_repeat() -> None:
    rand = MechanismRandom.secret()
    u = rand.random(200_000)
    z = rand.normal(0.0, 2.0, (400, 500))

    assert rand.label == OS_ENTROPY and not rand.deterministic
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.005
    assert z.shape == (400, 500) and abs(z.mean()) < 0.02 and z.std() == pytest.approx(2.0, rel=0.01)
    assert abs(((z / 2.0) ** 4).mean() - 3.0) < 0.1  # Gaussian kurtosis
    again = MechanismRandom.secret()
    assert not np.array_equal(again.random(8), MechanismRandom.secret().random(8))
    assert not np.array_equal(again.generator().random(4), again.generator().random(4))


def test_secure_mode_construction_keeps_the_standard_deviation() -> None:
    z = MechanismRandom.secret().normal(1.0, 3.0, 100_000, secure=True)
    assert z.mean() == pytest.approx(1.0, abs=0.05) and z.std() == pytest.approx(3.0, rel=0.02)


def test_seeded_is_reproducible_per_purpose_and_labelled_not_private() -> None:
    a = mechanism_random(deterministic=True, seed=3, purpose=("client-0", 1, "train"))
    b = mechanism_random(deterministic=True, seed=3, purpose=("client-0", 1, "train"))
    c = mechanism_random(deterministic=True, seed=3, purpose=("client-0", 2, "train"))

    assert a.label == SEEDED and "NOT private" in a.label
    assert np.array_equal(a.normal(0, 1, 5), b.normal(0, 1, 5))
    assert not np.array_equal(b.normal(0, 1, 5), c.normal(0, 1, 5))
    assert mechanism_random(deterministic=False, seed=3, purpose=()).label == OS_ENTROPY
