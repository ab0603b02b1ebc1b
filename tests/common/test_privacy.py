"""ε maths, calibration, the accountant's state and step hook."""

import json
import math

import numpy as np
import pytest
import torch
from fedrec.common.errors import ConfigError, PrivacyError
from fedrec.common.privacy.accountant import PrivacyAccountant
from fedrec.common.privacy.analysis import (
    MechanismStep,
    calibrate_noise,
    check_delta,
    default_delta,
    epsilon,
)
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer

# RDP ε for σ=1.0, q=0.01, 1000 steps, δ=1e-5 with Opacus 1.6's default orders (computed once).
GOLDEN_EPS = 2.1013652716


# --- ε ---------------------------------------------------------------------------------------


def test_golden_epsilon_matches_opacus_and_a_known_value() -> None:
    history = [MechanismStep(noise_multiplier=1.0, sample_rate=0.01, steps=1000)]
    reference = RDPAccountant()
    reference.history = [(1.0, 0.01, 1000)]

    eps = epsilon(history, delta=1e-5)

    assert eps == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert eps == pytest.approx(GOLDEN_EPS, rel=1e-3)


def test_rdp_and_prv_agree() -> None:
    history = [MechanismStep(noise_multiplier=1.1, sample_rate=0.02, steps=500)]

    rdp = epsilon(history, delta=1e-5)
    prv = epsilon(history, delta=1e-5, accountant="prv")

    assert prv <= rdp + 0.05  # PRV is the tighter accountant; 0.05 covers its eps_error
    assert abs(rdp - prv) / rdp < 0.3  # and not wildly different (here ~11%)


def test_composition_only_adds() -> None:
    a, b = MechanismStep(noise_multiplier=2.0, sample_rate=0.1, steps=50), MechanismStep(noise_multiplier=5.0, sample_rate=1.0, steps=1)

    assert epsilon([a, b], delta=1e-5) > epsilon([a], delta=1e-5) > 0
    assert epsilon([], delta=1e-5) == 0.0
    assert epsilon([MechanismStep(noise_multiplier=0.0, sample_rate=1.0, steps=1)], delta=1e-5) == math.inf


def test_epsilon_rejects_bad_arguments() -> None:
    history = [MechanismStep(noise_multiplier=1.0, sample_rate=0.5, steps=1)]
    with pytest.raises(ConfigError, match="'moments' is not known"):
        epsilon(history, delta=1e-5, accountant="moments")
    with pytest.raises(PrivacyError, match="delta=1.0"):
        epsilon(history, delta=1.0)


def test_mechanism_step_validates_and_normalises() -> None:
    step = MechanismStep(noise_multiplier=np.float32(1.5), sample_rate=np.float64(0.25), steps=np.int64(3))

    assert (type(step.noise_multiplier), type(step.sample_rate), type(step.steps)) == (float, float, int)
    assert step == MechanismStep(noise_multiplier=1.5, sample_rate=0.25, steps=3)
    with pytest.raises(PrivacyError, match="noise_multiplier=-1"):
        MechanismStep(noise_multiplier=-1.0, sample_rate=0.5, steps=1)
    with pytest.raises(PrivacyError, match="sample_rate=0"):
        MechanismStep(noise_multiplier=1.0, sample_rate=0, steps=1)
    with pytest.raises(PrivacyError, match="steps=True"):
        MechanismStep(noise_multiplier=1.0, sample_rate=0.5, steps=True)


# --- calibration -----------------------------------------------------------------------------


def test_calibration_meets_target_within_tol() -> None:
    sigma = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.1, steps=100)

    eps = epsilon([MechanismStep(noise_multiplier=sigma, sample_rate=0.1, steps=100)], delta=1e-5)
    assert 8.0 - 0.01 <= eps <= 8.0


def test_calibration_accounts_for_the_prior() -> None:
    prior = [MechanismStep(noise_multiplier=5.0, sample_rate=1.0, steps=1)]

    alone = calibrate_noise(target_epsilon=2.0, delta=1e-5, sample_rate=1.0, steps=5)
    with_prior = calibrate_noise(target_epsilon=2.0, delta=1e-5, sample_rate=1.0, steps=5, prior=prior)
    prv = calibrate_noise(target_epsilon=2.0, delta=1e-5, sample_rate=1.0, steps=5, accountant="prv")

    assert with_prior > alone
    assert 2.0 - 0.01 <= epsilon([*prior, MechanismStep(noise_multiplier=with_prior, sample_rate=1.0, steps=5)], delta=1e-5) <= 2.0
    assert epsilon([MechanismStep(noise_multiplier=prv, sample_rate=1.0, steps=5)], delta=1e-5, accountant="prv") <= 2.0
    assert prv < alone  # the tighter accountant needs less noise for the same ε


def test_calibration_refuses_when_prior_spends_everything() -> None:
    with pytest.raises(PrivacyError, match=r"already spend ε=\d+\.\d+ of target_epsilon=0.5"):
        calibrate_noise(target_epsilon=0.5, delta=1e-5, sample_rate=0.1, steps=10,
                        prior=[MechanismStep(noise_multiplier=0.5, sample_rate=1.0, steps=1)])


@pytest.mark.parametrize(
    ("overrides", "error", "needle"),
    [
        ({"target_epsilon": 0.0}, PrivacyError, "target_epsilon=0.0"),
        ({"delta": 1.0}, PrivacyError, "delta=1.0"),
        ({"sample_rate": 1.5}, PrivacyError, "sample_rate=1.5"),
        ({"steps": 0}, PrivacyError, "steps=0"),
        ({"tol": 0.0}, ConfigError, "tol=0.0"),
        ({"accountant": "gdp"}, ConfigError, "'gdp' is not known"),
    ],
)
def test_calibration_validates_its_arguments(overrides: dict, error: type, needle: str) -> None:
    args = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.1, "steps": 10} | overrides
    with pytest.raises(error, match=needle):
        calibrate_noise(**args)


# --- δ ---------------------------------------------------------------------------------------


def test_delta_rules() -> None:
    assert default_delta(943) == 1e-5
    assert default_delta(1_000_000) == pytest.approx(1e-7)
    check_delta(1e-5, 943)
    with pytest.raises(PrivacyError, match=r"must be > 0 and < 1/users = 0.00106 for 943 users.*use e.g. 1e-05"):
        check_delta(0.01, 943)
    with pytest.raises(PrivacyError, match="< 1/users"):
        check_delta(0.1, 10)  # exactly 1/users is not enough
    with pytest.raises(PrivacyError, match="at least one user"):
        check_delta(1e-5, 0)


# --- the accountant --------------------------------------------------------------------------


def test_accountant_state_round_trip_and_merge() -> None:
    acc = PrivacyAccountant()
    acc.step(noise_multiplier=5.0, sample_rate=1.0)
    acc.step(noise_multiplier=1.2, sample_rate=0.1, steps=3)
    acc.step(noise_multiplier=1.2, sample_rate=0.1, steps=2)

    again = PrivacyAccountant()
    again.load_state_dict(json.loads(json.dumps(acc.state_dict())))

    assert acc.state_dict() == {"version": 1, "accountant": "rdp", "history": [[5.0, 1.0, 1], [1.2, 0.1, 5]]}
    assert again.history == acc.history == (MechanismStep(noise_multiplier=5.0, sample_rate=1.0, steps=1), MechanismStep(noise_multiplier=1.2, sample_rate=0.1, steps=5))
    assert again.epsilon(1e-5) == acc.epsilon(1e-5)


@pytest.mark.parametrize(
    ("state", "needle"),
    [
        ({"version": 2, "accountant": "rdp", "history": []}, "version 2"),
        ({"version": True, "accountant": "rdp", "history": []}, "version True"),
        ({"version": 1, "accountant": "prv", "history": []}, "is for 'prv'"),
        ({"version": 1, "accountant": "rdp"}, "no history list"),
        ({"version": 1, "accountant": "rdp", "history": [[-1.0, 0.1, 1]]}, "entry 0: noise_multiplier"),
        ({"version": 1, "accountant": "rdp", "history": [[float("nan"), 0.1, 1]]}, "noise_multiplier"),
        ({"version": 1, "accountant": "rdp", "history": [[1.0, 0.1, 1], [1.0, 1.5, 1]]}, "entry 1: sample_rate"),
        ({"version": 1, "accountant": "rdp", "history": [[1.0, 0.1, 1.5]]}, "steps=1.5"),
        ({"version": 1, "accountant": "rdp", "history": [["1.0", 0.1, 1]]}, "noise_multiplier='1.0'"),
        ({"version": 1, "accountant": "rdp", "history": [[1.0, 0.1]]}, r"entry 0 must be \[σ, q, steps\]"),
        ([1, "rdp", []], "must be a mapping"),
    ],
)
def test_bad_state_is_rejected_without_change(state: object, needle: str) -> None:
    acc = PrivacyAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.5)

    with pytest.raises(PrivacyError, match=needle):
        acc.load_state_dict(state)  # type: ignore[arg-type]

    assert acc.history == (MechanismStep(noise_multiplier=1.0, sample_rate=0.5, steps=1),)


def test_would_exceed_is_hypothetical() -> None:
    acc = PrivacyAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.1, steps=100)
    spent = acc.epsilon(1e-5)
    block = {"delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 0.1}

    assert acc.would_exceed(budget=spent + 0.01, steps=100, **block)
    assert not acc.would_exceed(budget=spent + 10, steps=1, **block)
    assert acc.history == (MechanismStep(noise_multiplier=1.0, sample_rate=0.1, steps=100),)


def test_step_hook_records_what_the_opacus_optimizer_ran() -> None:
    torch.manual_seed(0)
    model = GradSampleModule(torch.nn.Linear(3, 1))
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.3,
                      max_grad_norm=1.0, expected_batch_size=4)
    ours, reference = PrivacyAccountant(), RDPAccountant()
    ours_hook, reference_hook = ours.make_step_hook(0.05), reference.get_optimizer_hook_fn(0.05)
    opt.attach_step_hook(lambda o: (ours_hook(o), reference_hook(o)))
    before = model._module.weight.detach().clone()

    def backward() -> None:
        model(torch.randn(4, 3, requires_grad=True)).pow(2).mean().backward()

    for _ in range(2):  # two plain steps at σ=1.3
        backward()
        opt.step()
        opt.zero_grad()
    backward()
    opt.signal_skip_step(do_skip=True)
    opt.step()  # skipped while accumulating: no noise, nothing to record
    opt.zero_grad()
    opt.noise_multiplier = 2.0
    backward()
    backward()  # two micro-batches in one noised step: sample rate 2q, as Opacus counts it
    opt.step()

    assert not torch.equal(model._module.weight, before)
    assert ours.history == (MechanismStep(noise_multiplier=1.3, sample_rate=0.05, steps=2), MechanismStep(noise_multiplier=2.0, sample_rate=0.1, steps=1))
    assert [tuple(h) for h in reference.history] == [(1.3, 0.05, 2), (2.0, 0.1, 1)]
    assert ours.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_step_hook_refuses_an_effective_sample_rate_above_one() -> None:
    acc = PrivacyAccountant()
    hook = acc.make_step_hook(0.6)

    class Optimizer:  # the two attributes Opacus' optimizer exposes to hooks
        noise_multiplier = 1.0
        accumulated_iterations = 2

    with pytest.raises(PrivacyError, match="effective sample rate 1.2 > 1"):
        hook(Optimizer())
    with pytest.raises(PrivacyError, match="make_step_hook: sample_rate=0"):
        acc.make_step_hook(0.0)
    assert acc.history == ()
