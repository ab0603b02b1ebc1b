"""ε maths, calibration, the accountant's state, private counts."""

import math

import numpy as np
import pytest
import torch
from fedrec.common.errors import PrivacyError
from fedrec.common.privacy import (
    MechanismStep,
    PrivacyAccountant,
    calibrate_noise,
    check_delta,
    default_delta,
    epsilon,
    private_counts,
)
from opacus.accountants import RDPAccountant

# RDP ε for σ=1.0, q=0.01, 1000 steps, δ=1e-5 with Opacus 1.6's default orders (computed once).
GOLDEN_EPS = 2.1013652716


def test_golden_epsilon_matches_opacus_and_a_known_value() -> None:
    history = [MechanismStep(1.0, 0.01, 1000)]
    reference = RDPAccountant()
    reference.history = [(1.0, 0.01, 1000)]

    eps = epsilon(history, delta=1e-5)

    assert eps == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert eps == pytest.approx(GOLDEN_EPS, rel=1e-3)


def test_rdp_and_prv_agree() -> None:
    history = [MechanismStep(1.1, 0.02, 500)]
    rdp, prv = epsilon(history, delta=1e-5), epsilon(history, delta=1e-5, accountant="prv")
    assert prv <= rdp + 0.05  # PRV is the tighter accountant
    assert abs(rdp - prv) / rdp < 0.3


def test_composition_only_adds() -> None:
    a, b = MechanismStep(2.0, 0.1, 50), MechanismStep(5.0, 1.0, 1)
    assert epsilon([a, b], delta=1e-5) > epsilon([a], delta=1e-5) > 0
    assert epsilon([], delta=1e-5) == 0.0
    assert epsilon([MechanismStep(0.0, 1.0, 1)], delta=1e-5) == math.inf


def test_calibration_meets_target_and_accounts_for_the_prior() -> None:
    sigma = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.1, steps=100)
    eps = epsilon([MechanismStep(sigma, 0.1, 100)], delta=1e-5)
    prior = [MechanismStep(5.0, 1.0, 1)]
    with_prior = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.1, steps=100, prior=prior)

    assert 8.0 - 0.01 <= eps <= 8.0
    assert with_prior > sigma
    assert epsilon([*prior, MechanismStep(with_prior, 0.1, 100)], delta=1e-5) <= 8.0


def test_calibration_refuses_when_prior_spends_everything() -> None:
    with pytest.raises(PrivacyError, match="already spend"):
        calibrate_noise(target_epsilon=0.5, delta=1e-5, sample_rate=0.1, steps=10,
                        prior=[MechanismStep(0.5, 1.0, 1)])
    with pytest.raises(PrivacyError, match="sample rate"):
        calibrate_noise(target_epsilon=1.0, delta=1e-5, sample_rate=1.5, steps=10)


def test_delta_rules() -> None:
    assert default_delta(943) < 1 / 943
    check_delta(1e-5, 943)
    with pytest.raises(PrivacyError, match="must be < 1/users"):
        check_delta(0.01, 943)


def test_accountant_state_round_trip_and_merge() -> None:
    acc = PrivacyAccountant()
    acc.step(noise_multiplier=5.0, sample_rate=1.0)
    acc.step(noise_multiplier=1.2, sample_rate=0.1, steps=3)
    acc.step(noise_multiplier=1.2, sample_rate=0.1, steps=2)

    again = PrivacyAccountant()
    again.load_state_dict(acc.state_dict())

    assert acc.history == (MechanismStep(5.0, 1.0, 1), MechanismStep(1.2, 0.1, 5))
    assert again.history == acc.history
    assert again.epsilon(1e-5) == acc.epsilon(1e-5)


@pytest.mark.parametrize(
    ("state", "needle"),
    [
        ({"version": 2, "accountant": "rdp", "history": []}, "version"),
        ({"version": 1, "accountant": "prv", "history": []}, "is for 'prv'"),
        ({"version": 1, "accountant": "rdp", "history": [[-1.0, 0.1, 1]]}, "noise multiplier"),
        ({"version": 1, "accountant": "rdp", "history": [[1.0, 1.5, 1]]}, "sample rate"),
        ({"version": 1, "accountant": "rdp", "history": [[1.0, 0.1, 1.5]]}, "steps"),
        ({"version": 1, "accountant": "rdp", "history": [[1.0, 0.1]]}, "entry 0"),
    ],
)
def test_bad_state_is_rejected_without_change(state: dict, needle: str) -> None:
    acc = PrivacyAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.5)
    with pytest.raises(PrivacyError, match=needle):
        acc.load_state_dict(state)
    assert acc.history == (MechanismStep(1.0, 0.5, 1),)


def test_would_exceed() -> None:
    acc = PrivacyAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.1, steps=100)
    spent = acc.epsilon(1e-5)
    assert acc.would_exceed(budget=spent + 0.01, delta=1e-5, noise_multiplier=1.0, sample_rate=0.1, steps=100)
    assert not acc.would_exceed(budget=spent + 10, delta=1e-5, noise_multiplier=1.0, sample_rate=0.1, steps=1)


def test_step_hook_records_what_the_opacus_optimizer_ran() -> None:
    from opacus.optimizers import DPOptimizer

    layer = torch.nn.Linear(3, 1)
    opt = DPOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), noise_multiplier=1.3,
                      max_grad_norm=1.0, expected_batch_size=2)
    acc = PrivacyAccountant()
    opt.attach_step_hook(acc.make_step_hook(0.05))
    for p in layer.parameters():
        p.grad_sample = torch.randn(2, *p.shape)

    opt.step()

    reference = RDPAccountant()
    reference.history = [(1.3, 0.05, 1)]
    assert acc.history == (MechanismStep(1.3, 0.05, 1),)
    assert acc.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5))


def test_private_counts_clip_and_noise() -> None:
    users = [np.array([0, 1, 2, 3]), np.array([1]), np.array([1, 1, 4])]
    rng = np.random.default_rng(0)

    exact = private_counts(users, num_items=6, clip_norm=1e6, noise_multiplier=0.0, rng=rng)
    clipped = private_counts(users, num_items=6, clip_norm=1.0, noise_multiplier=0.0, rng=rng)
    noisy = [private_counts([], num_items=2000, clip_norm=2.0, noise_multiplier=3.0, rng=rng)]

    assert exact.tolist() == [1, 3, 1, 1, 1, 0]
    # user 0 has 4 items -> each weighs 1/2, so their vector has norm exactly 1
    assert clipped.tolist() == pytest.approx([0.5, 0.5 + 1 + 1 / math.sqrt(2), 0.5, 0.5, 1 / math.sqrt(2), 0])
    assert np.std(noisy[0]) == pytest.approx(6.0, rel=0.1)
