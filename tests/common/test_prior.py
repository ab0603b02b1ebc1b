"""The private collaborative signal: per-user bounds (golden), noise, the ε split, the head, the CF
score and its reasons, files, validation."""

import math

import numpy as np
import pytest
from fedrec.common.errors import ConfigError, DataError, PrivacyError
from fedrec.common.prior import (
    NOISE_SHRINK,
    CollaborativePrior,
    cooccurrence_sum,
    exact_prior,
    head_items,
    history_matrix,
    load_prior,
    noisy_cooccurrence,
    per_user_norms,
    plan_releases,
    popularity_sum,
    prior_noise,
    private_counts,
    private_prior,
    save_prior,
    user_items,
)
from fedrec.common.privacy.accountant import PrivacyAccountant
from fedrec.common.privacy.analysis import MechanismStep, epsilon

# --- popularity (moved from test_privacy.py) ---


def test_private_counts_without_noise_or_clipping_are_plain_counts() -> None:
    users = [np.array([0, 1, 2, 3]), np.array([1]), np.array([1, 1, 4]), np.array([], dtype=np.int64)]

    counts = private_counts(users, num_items=6, clip_norm=1e6, noise_multiplier=0.0,
                            rng=np.random.default_rng(0))

    assert counts.dtype == np.float64
    assert counts.tolist() == [1, 3, 1, 1, 1, 0]


def test_private_counts_clip_each_user_to_the_bound() -> None:
    rng = np.random.default_rng(0)
    users = [rng.choice(50, size=rng.integers(1, 30), replace=False) for _ in range(20)]

    per_user = [private_counts([u], num_items=50, clip_norm=2.0, noise_multiplier=0.0, rng=rng) for u in users]
    total = private_counts(users, num_items=50, clip_norm=2.0, noise_multiplier=0.0, rng=rng)

    norms = [np.linalg.norm(v) for v in per_user]
    assert max(norms) <= 2.0 + 1e-12
    assert [n == pytest.approx(min(2.0, math.sqrt(len(u)))) for n, u in zip(norms, users)] == [True] * 20
    assert np.allclose(total, np.sum(per_user, axis=0))


def test_private_counts_noise_has_std_sigma_times_clip() -> None:
    users = [np.array([0, 1])] * 10

    noisy = private_counts(users, num_items=5000, clip_norm=2.0, noise_multiplier=3.0,
                           rng=np.random.default_rng(1))

    noise = noisy - private_counts(users, num_items=5000, clip_norm=2.0, noise_multiplier=0.0,
                                   rng=np.random.default_rng(1))
    assert np.std(noise) == pytest.approx(6.0, rel=0.05)
    assert abs(np.mean(noise)) < 0.3


def test_private_counts_reject_bad_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match=r"user #1 must hold integer item indices in \[0, 3\)"):
        private_counts([np.array([0]), np.array([3])], num_items=3, clip_norm=1.0, noise_multiplier=1.0, rng=rng)
    with pytest.raises(DataError, match="user #0"):
        private_counts([np.array([-1])], num_items=3, clip_norm=1.0, noise_multiplier=1.0, rng=rng)
    with pytest.raises(PrivacyError, match="clip_norm=0"):
        private_counts([], num_items=3, clip_norm=0, noise_multiplier=1.0, rng=rng)
    with pytest.raises(PrivacyError, match="noise_multiplier=-1"):
        private_counts([], num_items=3, clip_norm=1.0, noise_multiplier=-1.0, rng=rng)


def test_prior_noise_spends_its_share_of_the_budget() -> None:
    sigma = prior_noise(target_epsilon=8.0, delta=1e-5, share=0.5)
    assert epsilon([MechanismStep(noise_multiplier=sigma, sample_rate=1.0, steps=1)], delta=1e-5) == pytest.approx(4.0, rel=0.02)
    assert epsilon([MechanismStep(noise_multiplier=sigma, sample_rate=1.0, steps=1)], delta=1e-5) <= 4.0 + 1e-9
    assert prior_noise(target_epsilon=8.0, delta=1e-5, share=0.5, fixed=5.0) == 5.0
    smaller = prior_noise(target_epsilon=1.0, delta=1e-5, share=0.5)
    assert smaller > sigma  # less budget, more noise


# --- co-occurrence: the per-user bound ---------------------------------------------------------


def test_one_users_contribution_is_golden_and_within_the_bound() -> None:
    head = np.array([1, 2, 5])
    user = [np.array([1, 2, 3, 5])]  # 3 of its 4 items are in the head

    matrix = cooccurrence_sum(user, head=head, clip=1.0)
    popularity = popularity_sum(user, num_items=6, clip=1.0)

    # x = 1/√3 on each head item: x xᵀ = 1/3 everywhere, Frobenius norm exactly 1
    assert np.allclose(matrix, np.full((3, 3), 1 / 3))
    assert np.linalg.norm(matrix) == pytest.approx(1.0)
    assert np.allclose(popularity, [0, 0.5, 0.5, 0.5, 0, 0.5])  # 1/√4 on each of its 4 items


def test_no_user_moves_either_release_by_more_than_the_clip() -> None:
    rng = np.random.default_rng(0)
    users = [rng.choice(40, size=rng.integers(1, 25), replace=False) for _ in range(50)]
    head = np.sort(rng.choice(40, size=12, replace=False))

    for clip in (0.5, 1.0, 3.0):
        pop, co = per_user_norms(users, num_items=40, head=head, clip=clip)
        assert pop.max() <= clip + 1e-12 and co.max() <= clip + 1e-12
        assert co.max() == pytest.approx(clip)  # the bound is tight (a user with ≥ clip head items)
    total = cooccurrence_sum(users, head=head, clip=1.0)
    assert np.allclose(total, sum(cooccurrence_sum([u], head=head, clip=1.0) for u in users))
    assert np.allclose(total, total.T)


def test_co_occurrence_noise_is_symmetric_with_std_sigma_times_clip() -> None:
    users = [np.array([0, 1])] * 3
    head = np.arange(150)

    noisy = noisy_cooccurrence(users, head=head, clip=2.0, noise_multiplier=1.5, rng=np.random.default_rng(3))
    noise = noisy - cooccurrence_sum(users, head=head, clip=2.0)

    assert np.allclose(noise, noise.T)
    upper = noise[np.triu_indices(150)]
    assert np.std(upper) == pytest.approx(3.0, rel=0.03)


def test_two_releases_compose_to_the_planned_share_and_split() -> None:
    plan = plan_releases(epsilon=8.0, delta=1e-5, share=0.75, popularity_share=0.3, cooccurrence=True)
    combined = 1 / math.sqrt(plan.popularity_sigma**-2 + plan.cooccurrence_sigma**-2)

    accountant = PrivacyAccountant()
    for step in plan.steps:
        accountant.step(noise_multiplier=step.noise_multiplier, sample_rate=1.0, steps=1)

    assert accountant.epsilon(1e-5) == pytest.approx(6.0, rel=0.02) and accountant.epsilon(1e-5) <= 6.0 + 1e-9
    # two Gaussians at q = 1 compose exactly like one: the ledger's two lines and one σ_eff agree
    assert accountant.epsilon(1e-5) == pytest.approx(epsilon([MechanismStep(noise_multiplier=combined, sample_rate=1.0, steps=1)], delta=1e-5),
                                                     rel=1e-6)
    assert (combined / plan.popularity_sigma) ** 2 == pytest.approx(0.3)  # popularity's share of ρ
    assert plan_releases(epsilon=8.0, delta=1e-5, share=0.75, popularity_share=0.3,
                         cooccurrence=False).cooccurrence_sigma is None
    with pytest.raises(ConfigError, match="popularity_share"):
        plan_releases(epsilon=8.0, delta=1e-5, share=0.5, popularity_share=1.0, cooccurrence=True)


def test_the_head_is_chosen_from_the_noisy_counts() -> None:
    noisy = np.array([5.0, -1.0, 9.0, 5.0, 0.5])
    assert head_items(noisy, 3).tolist() == [0, 2, 3]  # ties: the lower index
    assert head_items(noisy, 10).tolist() == [0, 1, 2, 3, 4]
    prior = private_prior([[0, 1], [1, 2]], num_items=3, clip=1.0, head_size=2,
                          plan=plan_releases(epsilon=1.0, delta=1e-5, share=1.0, popularity_share=0.3,
                                             cooccurrence=True), rng=np.random.default_rng(0))
    assert prior.head.tolist() == head_items(prior.popularity, 2).tolist()


# --- the CF score --------------------------------------------------------------------------------


def test_cf_score_is_the_shrunk_cosine_summed_over_the_history() -> None:
    prior = exact_prior([[0, 1], [0, 1, 2], [2, 3]], num_items=5, head_size=4)
    c = prior.cooccurrence
    assert prior.head.tolist() == [0, 1, 2, 3]

    scores = prior.scores([[0, 2]], beta=0.5, shrink=1.0)

    def sim(i: int, j: int) -> float:
        return c[i, j] / (math.sqrt(c[i, i] * c[j, j]) + 1.0)

    pop = np.log1p(prior.popularity)
    expected_1 = (sim(0, 1) + sim(2, 1)) / math.sqrt(2) + 0.5 * pop[1]
    assert scores[0, 1] == pytest.approx(expected_1)
    assert scores[0, 0] == pytest.approx(sim(2, 0) / math.sqrt(2) + 0.5 * pop[0])  # no self-similarity
    assert scores[0, 4] == pytest.approx(0.5 * pop[4])  # off the head: popularity only
    assert prior.reasons([0, 2, 3], 1, shrink=1.0) == [0, 2]  # 3 never co-occurs with 1
    assert history_matrix([[0, 0, 7]], prior.head).tolist() == [[1 / math.sqrt(2), 0, 0, 0]]


def test_the_shrinkage_grows_with_the_noise_of_the_release() -> None:
    exact = exact_prior([[0, 1], [0, 1, 2], [2, 3]], num_items=5, head_size=4)
    noisy = CollaborativePrior(exact.popularity, exact.head, exact.cooccurrence, noise_std=2.0)
    c = exact.cooccurrence

    assert exact.shrinkage(1.0) == 1.0 and noisy.shrinkage(1.0) == NOISE_SHRINK * 2.0
    assert noisy.shrinkage(100.0) == 100.0  # never below the configured shrink
    assert noisy.similarity(shrink=1.0)[0, 1] == pytest.approx(c[0, 1] / (math.sqrt(c[0, 0] * c[1, 1])
                                                                          + NOISE_SHRINK * 2.0))
    plan = plan_releases(epsilon=4.0, delta=1e-5, share=1.0, popularity_share=0.3, cooccurrence=True)
    released = private_prior([[0, 1], [1, 2]], num_items=4, plan=plan, head_size=3, clip=0.5,
                             rng=np.random.default_rng(0))
    assert released.noise_std == pytest.approx(plan.cooccurrence_sigma * 0.5)
    with pytest.raises(DataError, match="noise_std"):
        CollaborativePrior(exact.popularity, exact.head, exact.cooccurrence, noise_std=float("nan"))


def test_dp_cooccurrence_beats_popularity_on_a_structured_population() -> None:
    # two taste groups: each user holds most of their group's 10 items; one item is held out
    rng = np.random.default_rng(0)
    histories, targets = [], []
    for u in range(600):
        group = np.arange(10) + 10 * (u % 2)
        items = list(rng.permutation(group)[:6])
        histories.append(items[:-1])
        targets.append(items[-1])
    plan = plan_releases(epsilon=4.0, delta=1e-4, share=1.0, popularity_share=0.3, cooccurrence=True)
    prior = private_prior(histories, num_items=20, plan=plan, head_size=20, clip=1.0, rng=np.random.default_rng(1))

    scores = prior.scores(histories, beta=0.0, shrink=5.0)
    for u, h in enumerate(histories):
        scores[u, h] = -np.inf
    hits = np.mean([int(np.argsort(-scores[u])[0] in range(10 * (u % 2), 10 * (u % 2) + 10))
                    for u in range(600)])
    assert hits > 0.95  # the private co-occurrence still tells the two groups apart


# --- files and validation --------------------------------------------------------------------


def test_prior_round_trips_through_its_file(tmp_path) -> None:
    prior = exact_prior([[0, 1], [1, 2]], num_items=4, head_size=3)

    save_prior(tmp_path, prior)
    loaded = load_prior(tmp_path / "prior.safetensors")

    assert np.allclose(loaded.popularity, prior.popularity) and loaded.head.tolist() == prior.head.tolist()
    assert np.allclose(loaded.cooccurrence, prior.cooccurrence)
    noisy = CollaborativePrior(prior.popularity, prior.head, prior.cooccurrence, noise_std=1.5)
    save_prior(tmp_path / "noisy", noisy)
    assert load_prior(tmp_path / "noisy" / "prior.safetensors").noise_std == pytest.approx(1.5)
    older = {k: v for k, v in noisy.tensors().items() if k != "noise_std"}  # a file from before it existed
    assert CollaborativePrior.from_tensors(older, source="old").noise_std == 0.0


@pytest.mark.parametrize(("popularity", "head", "cooc", "match"), [
    (np.array([1.0, np.nan]), np.array([0]), np.ones((1, 1)), "NaN"),
    (np.array([1.0, 2.0]), np.array([0, 2]), np.ones((2, 2)), "item indices"),
    (np.array([1.0, 2.0]), np.array([1, 0]), np.ones((2, 2)), "sorted"),
    (np.array([1.0, 2.0]), np.array([0, 1]), np.ones((3, 3)), "shape"),
    (np.array([1.0, 2.0]), np.array([0, 1]), np.array([[1.0, np.inf], [0, 1]]), "infinite"),
])
def test_a_malformed_prior_is_refused(popularity, head, cooc, match) -> None:
    with pytest.raises(DataError, match=match):
        CollaborativePrior(popularity, head, cooc)


def test_user_items_reject_bad_indices() -> None:
    with pytest.raises(DataError, match="user #0"):
        user_items([[0.5]], num_items=3)
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        noisy_cooccurrence([], head=np.array([0]), clip=1.0, noise_multiplier=float("nan"),
                           rng=np.random.default_rng(0))
