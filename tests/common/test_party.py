"""The one party: its δ, its plan (golden σ's, the numbers of the code before the party existed),
its refusals, its records and its state."""

from __future__ import annotations

import math

import pytest
from fedrec.common.errors import DataError, PrivacyError
from fedrec.common.ledger import MECHANISM_DP_SGD, MECHANISM_NON_PRIVATE, PRIOR_MECHANISMS
from fedrec.common.privacy.analysis import MechanismStep, epsilon
from fedrec.common.privacy.party import Party

# Golden values: 24 users (δ = 1e-5), the default client policy (prior share 0.85, popularity 0.3
# of it, evaluations 0.1 of ε), q = 0.25 and 4 steps per round, 3 rounds announced at round 1.
CLIENT = {  # budget: (σ popularity, σ co-occurrence, σ evaluation, σ DP-SGD)
    8.0: (1.3363217996423242, 0.8748279713829376, 11.125, 1.46484375),
    2.0: (4.564354645876384, 2.988071523335984, 42.0, 4.0625),
    1.0: (8.672273827165132, 5.67733589433837, 42.0, 7.75),  # 0.1 of ε uncertifiable: target doubled
}


def client_plan(party: Party) -> tuple[float, float, float, float]:
    """The federated client's plan at round 1 of 3 (client/local.py), through the party."""
    prior = party.prior_plan(share=0.85, popularity_share=0.3, cooccurrence=True)
    evals = party.eval_sigma(share=0.1, releases=3 + 2)  # a validation per round, two test evaluations
    planned = [*prior.steps, MechanismStep(noise_multiplier=evals, sample_rate=1.0, steps=3 + 2)]
    sgd = party.sgd_sigma(sample_rate=0.25, steps=4 * 3, planned=lambda: planned)
    assert prior.cooccurrence_sigma is not None
    return prior.popularity_sigma, prior.cooccurrence_sigma, evals, sgd


@pytest.mark.parametrize("budget", sorted(CLIENT))
def test_a_clients_plan_is_the_golden_one(budget: float) -> None:
    party = Party(name="c", users=24, budget=budget)

    assert party.delta == 1e-5
    assert client_plan(party) == CLIENT[budget]


def test_a_central_party_spends_what_the_prior_left_on_dp_sgd() -> None:
    party = Party(name="central-dp-lora", users=24, budget=4.0)
    plan = party.prior_plan(share=0.85, popularity_share=0.3, cooccurrence=True)
    for step, mechanism in zip(plan.steps, PRIOR_MECHANISMS, strict=True):
        party.record(mechanism, step, rnd=len(party.ledger.lines) + 1, clip_norm=1.0, rng="os-entropy", users=24)

    sigma = party.sgd_sigma(sample_rate=0.25, steps=10)

    assert (plan.popularity_sigma, plan.cooccurrence_sigma) == (2.442642915957284, 1.5990851511602726)
    assert sigma == 2.140625
    full = epsilon([*plan.steps, MechanismStep(noise_multiplier=sigma, sample_rate=0.25, steps=10)], delta=1e-5)
    assert 4.0 - 0.01 <= full <= 4.0  # everything planned spends the budget


def test_the_canary_audits_party_and_the_floor_and_the_kept_sigmas() -> None:
    assert Party(name="a", users=30, budget=1.0).sgd_sigma(sample_rate=0.25, steps=24) == 5.3125
    floored = Party(name="a", users=30, budget=1.0, min_noise_multiplier=9.0)
    assert floored.sgd_sigma(sample_rate=0.25, steps=24) == 9.0
    assert floored.sgd_sigma(sample_rate=0.25, steps=24, fixed=0.5) == 9.0  # a fixed σ is floored too
    floored.noise_multiplier, floored.eval_noise_multiplier = 3.0, 4.0
    assert floored.sgd_sigma(sample_rate=0.25, steps=24, fixed=20.0) == 3.0  # kept from the first round
    assert floored.eval_sigma(share=0.1, releases=5) == 4.0
    assert floored.eval_sigma(share=0.1, releases=5, fixed=6.0) == 6.0  # the policy's own σ first


def test_planned_releases_are_asked_for_only_when_sigma_is_calibrated() -> None:
    party = Party(name="c", users=24, budget=8.0)
    party.noise_multiplier = 2.0

    def boom() -> list[MechanismStep]:
        raise PrivacyError("planning failed")

    assert party.sgd_sigma(sample_rate=0.25, steps=4, planned=boom) == 2.0
    party.noise_multiplier = None
    with pytest.raises(PrivacyError, match="planning failed"):
        party.sgd_sigma(sample_rate=0.25, steps=4, planned=boom)


def test_delta_is_the_policys_or_the_default_and_below_one_over_users() -> None:
    assert Party(name="c", users=1_000_000, budget=8.0).delta == pytest.approx(1e-7)
    assert Party(name="c", users=10, budget=8.0, delta=0.05).delta == 0.05
    with pytest.raises(PrivacyError, match="< 1/users"):
        Party(name="c", users=10, budget=8.0, delta=0.1)


def test_a_release_over_the_budget_is_refused_with_its_reason() -> None:
    party = Party(name="hospital-a", users=24, budget=0.5)
    step = MechanismStep(noise_multiplier=0.6, sample_rate=0.25, steps=4)
    after = epsilon([step], delta=1e-5)

    refusal = party.refusal([step], "round 1")

    assert refusal is not None and refusal.epsilon == after
    assert refusal.reason == (f"hospital-a: round 1 would raise ε from 0.000 to {after:.3f}, over this client's "
                              "budget 0.5 (δ=1.0e-05); refused")
    assert party.refusal([MechanismStep(noise_multiplier=50.0, sample_rate=0.25, steps=4)], "round 1") is None
    assert party.accountant.history == ()  # asking spends nothing


def test_a_record_spends_once_and_says_epsilon_after_it() -> None:
    party = Party(name="c", users=24, budget=8.0, policy_sha256="ab" * 32)
    prior = MechanismStep(noise_multiplier=2.0, sample_rate=1.0, steps=1)
    sgd = MechanismStep(noise_multiplier=1.5, sample_rate=0.25, steps=4)

    first = party.record(PRIOR_MECHANISMS[0], prior, rnd=0, clip_norm=1.0, rng="os-entropy", run_id="r")
    party.accountant.step(noise_multiplier=1.5, sample_rate=0.25, steps=4)  # as DP-SGD's step hook does
    second = party.record(MECHANISM_DP_SGD, sgd, rnd=1, clip_norm=1.0, rng="os-entropy", accounted=True)
    off = party.record(MECHANISM_NON_PRIVATE, MechanismStep(noise_multiplier=0.0, sample_rate=1.0, steps=4), rnd=2,
                       clip_norm=0.0, rng="os-entropy")

    assert party.accountant.history == (prior, sgd, MechanismStep(noise_multiplier=0.0, sample_rate=1.0, steps=4))
    assert first.epsilon == epsilon([prior], delta=1e-5) and second.epsilon == epsilon([prior, sgd], delta=1e-5)
    assert math.isinf(off.epsilon) and off.dp is False and second.dp is True
    assert (first.seq, second.seq, second.prev_sha256) == (0, 1, first.entry_sha256)
    assert first.policy_sha256 == "ab" * 32 and first.budget == 8.0 and first.users is None
    assert first.run_id == "r" and second.run_id is None


def test_state_round_trips_and_a_bad_state_changes_nothing() -> None:
    party = Party(name="c", users=24, budget=8.0)
    party.record(PRIOR_MECHANISMS[0], MechanismStep(noise_multiplier=2.0, sample_rate=1.0, steps=1), rnd=0,
                 clip_norm=1.0, rng="os-entropy")
    party.noise_multiplier = 1.25
    state = party.state_dict()

    restored = Party(name="c", users=24, budget=8.0)
    restored.load_state_dict(state)

    assert restored.state_dict() == state and restored.ledger.lines == party.ledger.lines
    assert restored.spent == party.spent and restored.noise_multiplier == 1.25
    broken_line = {**state, "ledger": [{**state["ledger"][0], "steps": "one"}]}
    for bad, error in (({**state, "noise_multiplier": -1.0}, DataError), ({"ledger": []}, DataError),
                       (broken_line, DataError), ({**state, "accountant": {"version": 9}}, PrivacyError)):
        with pytest.raises(error):
            restored.load_state_dict(bad)
        assert restored.state_dict() == state
