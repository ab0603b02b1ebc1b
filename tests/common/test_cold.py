"""Cold-item split (nothing held out leaks into training), shelf metrics, cold users, content baseline."""

import math

import numpy as np
import pytest
from fedrec.common.cold import (
    ColdSplit,
    EvalSet,
    chance_metrics,
    cold_item_split,
    cold_users,
    content_scores,
    held_out_items,
    random_scores,
    shelf_metrics,
    title_years,
    warm_users,
)
from fedrec.common.data import Dataset, Split, leave_one_out
from fedrec.common.errors import ConfigError
from fedrec.common.evaluation import popularity_counts


def make_dataset(histories: dict[str, tuple[int, ...]], num_items: int, *, genres=None, titles=None) -> Dataset:
    ids = tuple(f"i{n}" for n in range(num_items))
    return Dataset(
        name="toy", item_ids=ids, item_titles=tuple(titles or ids), item_texts=ids,
        user_ids=tuple(histories), user_attributes={u: {} for u in histories}, histories=histories,
        item_genres=tuple(genres) if genres else (),
    )


def random_dataset(num_users: int = 40, num_items: int = 30, seed: int = 7) -> Dataset:
    rng = np.random.default_rng(seed)
    histories = {f"u{n}": tuple(int(i) for i in rng.permutation(num_items)[: rng.integers(3, 15)])
                 for n in range(num_users)}
    return make_dataset(histories, num_items)


def by_hand(held: list[int], users: dict[str, tuple[int, int, tuple[int, ...]]], num_items: int = 8) -> ColdSplit:
    """A ColdSplit whose shelf is `held`; users: id -> (target, unused, excluded held-out items)."""
    ids = tuple(users)
    evaluation = EvalSet(ids, tuple(() for _ in ids), np.array([users[u][0] for u in ids]),
                         tuple(users[u][2] for u in ids))
    return ColdSplit(np.array(held), {u: () for u in ids}, {}, {}, evaluation, num_items=num_items,
                     seed=0, fraction=len(held) / num_items)


# --- the split -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_held_out_items_reach_no_training_input(seed):
    # Prepare
    dataset = random_dataset()
    split = leave_one_out(dataset)
    # Execute
    cold = cold_item_split(dataset, split, fraction=0.3, seed=seed)
    view = cold.as_split()
    # Assert: the held-out items were in the data, and none is left in anything training reads
    hidden = set(cold.held_out.tolist())
    assert popularity_counts(dataset, split)[cold.held_out].sum() > 0
    assert all(not hidden.intersection(seq) for seq in view.train.values())
    assert not hidden.intersection(view.valid.values())
    assert not hidden.intersection(view.test.values())
    assert all(not hidden.intersection(h) for h in cold.evaluation.histories)
    assert np.all(popularity_counts(dataset, view)[cold.held_out] == 0)
    assert all(not hidden.intersection(h) for h in cold.hide(dataset).histories.values())
    # every user whose test item is held out is evaluated on it, and nobody else
    expected = {u for u, i in split.test.items() if i in hidden}
    assert set(cold.evaluation.user_ids) == expected and expected
    assert set(cold.evaluation.targets.tolist()) <= hidden
    assert set(view.train) == set(split.train)


def test_cold_split_golden():
    # Prepare: 10 items, 2 held out (fraction 0.2); histories built around them
    held = held_out_items(10, fraction=0.2, seed=3)
    a, b = held.tolist()
    warm = [i for i in range(10) if i not in (a, b)]
    histories = {
        "x": (warm[0], a, warm[1], warm[2], b),  # test item held out: evaluated
        "y": (warm[3], warm[4], b, warm[5]),  # valid item held out: dropped from valid
        "z": (warm[6], warm[7], a),  # test held out, history of one visible item
    }
    split = leave_one_out(make_dataset(histories, 10))
    # Execute
    cold = cold_item_split(make_dataset(histories, 10), split, fraction=0.2, seed=3)
    # Assert
    assert cold.held_out.tolist() == [a, b]
    assert cold.train == {"x": (warm[0], warm[1]), "y": (warm[3], warm[4]), "z": (warm[6],)}
    assert cold.valid == {"x": warm[2], "z": warm[7]}
    assert cold.test == {"y": warm[5]}
    assert cold.evaluation.user_ids == ("x", "z")
    assert cold.evaluation.histories == ((warm[0], warm[1], warm[2]), (warm[6], warm[7]))
    assert cold.evaluation.targets.tolist() == [b, a]
    assert cold.evaluation.exclude == ((a,), ())  # x consumed a earlier: not ranked against b
    assert cold.as_split() == Split(cold.train, cold.valid, cold.test)
    assert cold.known_items.tolist() == warm


def test_cold_split_refuses_a_leak():
    evaluation = EvalSet(("u",), ((1, 2),), np.array([2]), ((),))
    with pytest.raises(ValueError, match="held-out item"):
        ColdSplit(np.array([2, 5]), {"u": (1,)}, {}, {}, evaluation, num_items=8, seed=0, fraction=0.25)


def test_split_is_deterministic_by_seed():
    dataset = random_dataset()
    split = leave_one_out(dataset)
    first, again = (cold_item_split(dataset, split, fraction=0.2, seed=11) for _ in range(2))
    other = cold_item_split(dataset, split, fraction=0.2, seed=12)
    assert np.array_equal(first.held_out, again.held_out) and first.train == again.train
    assert first.evaluation.user_ids == again.evaluation.user_ids
    assert not np.array_equal(first.held_out, other.held_out)
    assert first.held_out.size == 6 and np.all(np.diff(first.held_out) > 0)
    shelf = first.held_out
    assert np.array_equal(random_scores([(1,)] * 3, shelf, seed=4), random_scores([(1,)] * 3, shelf, seed=4))
    assert not np.array_equal(random_scores([(1,)] * 3, shelf, seed=4), random_scores([(1,)] * 3, shelf, seed=5))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, 0.01])
def test_fraction_must_hold_out_some_but_not_all_items(fraction):
    dataset = random_dataset(num_items=30)
    with pytest.raises(ConfigError, match="fraction"):
        cold_item_split(dataset, leave_one_out(dataset), fraction=fraction)


# --- metrics on the shelf ------------------------------------------------------------------


def test_shelf_metrics_equal_hand_computed_values():
    # Prepare: shelf items 2, 5, 7 of 8
    cold = by_hand([2, 5, 7], {"a": (5, 0, ()), "b": (7, 0, (2,)), "c": (7, 0, ())})
    scores = np.array([
        [0.9, 0.5, 0.1],  # a: 2 above 5 -> rank 2
        [0.9, 0.2, 0.3],  # b: 2 above 7 but excluded (seen) -> rank 1
        [0.1, 0.4, 0.4],  # c: 5 ties 7, ties count against the target -> rank 2
    ])
    catalogue = np.full((3, 8), 99.0)
    catalogue[:, [2, 5, 7]] = scores
    # Execute
    metrics = shelf_metrics(scores, cold, ks=(1, 10))
    # Assert
    ndcg2 = 1 / math.log2(3)
    assert metrics["hr@1"] == pytest.approx(1 / 3)
    assert metrics["hr@10"] == 1.0
    assert metrics["ndcg@10"] == pytest.approx((ndcg2 + 1 + ndcg2) / 3)
    assert metrics["mrr@10"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert shelf_metrics(catalogue, cold, ks=(1, 10)) == metrics  # the other columns are ignored
    with pytest.raises(ValueError, match="expected"):
        shelf_metrics(scores[:, :2], cold)


def test_random_scores_average_to_the_exact_chance_level():
    # Prepare: a 3-item shelf; user b has seen one shelf item, so ranks 2
    cold = by_hand([2, 5, 7], {"a": (5, 0, ()), "b": (7, 0, (2,))})
    users = [()] * 2
    # Execute
    chance = chance_metrics(cold, ks=(1, 10))
    runs = [shelf_metrics(random_scores(users, cold.held_out, seed=s), cold, ks=(1, 10)) for s in range(2000)]
    # Assert: hand-computed (a: uniform over 3 ranks, b: over 2) and matched by simulation
    assert chance["hr@1"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert chance["hr@10"] == 1.0
    assert chance["mrr@10"] == pytest.approx(((1 + 1 / 2 + 1 / 3) / 3 + (1 + 1 / 2) / 2) / 2)
    ndcg = [1, 1 / math.log2(3), 1 / math.log2(4)]
    assert chance["ndcg@10"] == pytest.approx((sum(ndcg) / 3 + sum(ndcg[:2]) / 2) / 2)
    for key in ("hr@1", "ndcg@10", "mrr@10"):
        assert np.mean([r[key] for r in runs]) == pytest.approx(chance[key], abs=0.02)


# --- cold users ----------------------------------------------------------------------------


def test_cold_users_keep_the_last_items_and_the_targets():
    dataset = random_dataset()
    split = leave_one_out(dataset)
    cold = cold_item_split(dataset, split, fraction=0.3, seed=1)
    # Execute
    short = cold_users(cold, max_history=2)
    full = cold_users(split, max_history=2)
    # Assert: same users, targets and exclusions; only the visible history is cut
    assert short.evaluation.histories == tuple(h[-2:] for h in cold.evaluation.histories)
    assert all(len(h) <= 2 for h in short.evaluation.histories)
    assert np.array_equal(short.evaluation.targets, cold.evaluation.targets)
    assert short.evaluation.exclude == cold.evaluation.exclude and short.train == cold.train
    warm = warm_users(split)
    assert full.histories == tuple(h[-2:] for h in warm.histories)
    assert full.exclude == warm.exclude == tuple((*split.train[u], split.valid[u]) for u in warm.user_ids)
    assert np.array_equal(full.targets, [split.test[u] for u in warm.user_ids])
    with pytest.raises(ConfigError, match="max_history"):
        cold_users(split, max_history=0)


# --- content baseline ----------------------------------------------------------------------


def test_content_ranks_same_genre_and_closer_year_first():
    # Prepare: the user watched action films of the 1990s
    titles = ["Heat (1995)", "Speed (1994)", "Babe (1995)", "Die Hard (1988)", "Metropolis (1927)", "unknown"]
    genres = [("Action",), ("Action", "Thriller"), ("Comedy",), ("Action",), ("Action",), ("Action",)]
    dataset = make_dataset({"u": (0, 1)}, 6, genres=genres, titles=titles)
    shelf = np.array([2, 3, 4, 5])
    # Execute
    scores = content_scores(dataset, [(0, 1)], shelf)[0]
    # Assert: action above comedy; among equal genres the closer year first; unknown year: no penalty
    babe, die_hard, metropolis, unknown = scores
    assert die_hard > babe and metropolis > babe
    assert unknown > die_hard > metropolis
    profile = np.array([2.0, 1.0]) / math.sqrt(5)  # (Action, Thriller) counts, unit norm; Comedy 0
    assert unknown == pytest.approx(profile[0])
    assert die_hard == pytest.approx(profile[0] - 1e-3 * abs(1988 - 1994.5))
    assert np.array_equal(content_scores(dataset, [()], shelf), np.zeros((1, 4)))  # no history: all tie


def test_title_years():
    years = title_years(["Toy Story (1995)", "Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)",
                         "unknown", "Evita (1996) "])
    assert years[[0, 1, 3]].tolist() == [1995.0, 1995.0, 1996.0] and math.isnan(years[2])
