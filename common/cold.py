"""Cold start: the held-out-items split, the new-arrivals shelf metrics, cold users and content baselines.

Cold items. A seeded `fraction` of the catalogue is held out of every training input: the
held-out items are removed from every training sequence, a validation target that is held out is
dropped, and `ColdSplit.as_split()` (what training code, popularity, co-occurrence and LLM training
read) holds no held-out index anywhere. The evaluation users are those whose *test* item is held
out; a scorer sees their training sequence plus valid item with the held-out items removed (in the
simulated world nobody has interacted with a new arrival) and ranks the held-out items only (the
"new arrivals" shelf). Held-out items the user did consume before the target are excluded from
that user's ranking, as seen items are in the full-catalogue protocol (the metric knows them, the
scorer does not). Ties rank pessimistically (common/metrics.py).

Cold users. MovieLens users all have >= 20 ratings, so a new user is simulated by truncating each
evaluation user's visible history to its last `max_history` items; their targets and exclusions
stay those of the full history, so warm and cold users differ only in what the scorer sees. Their
earlier interactions stay in training: right for scorers with no per-user parameters (every
fedrec scorer ranks from the history alone), not for a model that memorises users.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import overload

import numpy as np
from fedrec.common.data import Dataset, Split
from fedrec.common.errors import ConfigError, DataError
from fedrec.common.metrics import evaluate_scores

# A scorer ranks the shelf for each user from their visible history only:
# (histories of U users, shelf (S,) catalogue indices) -> scores (U, S), higher is better.
Scorer = Callable[[Sequence[tuple[int, ...]], np.ndarray], np.ndarray]

YEAR_PENALTY = 1e-3  # content score lost per year from the history's mean year: a tie-breaker
_YEAR = re.compile(r"\((\d{4})\)\s*$")  # "Toy Story (1995)" -> 1995


@dataclass(frozen=True, eq=False)
class EvalSet:
    """Who is ranked on which target: what the scorer sees and what the metric drops."""

    user_ids: tuple[str, ...]
    histories: tuple[tuple[int, ...], ...]  # chronological; all a scorer may see of the user
    targets: np.ndarray  # (U,) catalogue indices
    exclude: tuple[tuple[int, ...], ...]  # catalogue indices dropped from the user's ranking

    def __post_init__(self) -> None:
        n = len(self.user_ids)
        if not len(self.histories) == len(self.exclude) == self.targets.shape[0] == n:
            raise ValueError("user_ids, histories, targets and exclude must have one entry per user")


@dataclass(frozen=True, eq=False)
class ColdSplit:
    """A leave-one-out split with `held_out` items removed from every training input."""

    held_out: np.ndarray  # (S,) sorted catalogue indices: the new-arrivals shelf
    train: Mapping[str, tuple[int, ...]]  # every user's training sequence, held-out items removed
    valid: Mapping[str, int]  # users whose valid item is not held out
    test: Mapping[str, int]  # warm test targets (not held out), for Split-compatible training code
    evaluation: EvalSet  # users whose test item is held out, ranked on the shelf
    num_items: int  # catalogue size
    seed: int
    fraction: float

    def __post_init__(self) -> None:
        _check_no_leak(self)

    def as_split(self) -> Split:
        """The training view: no held-out index in train, valid or test."""
        return Split(self.train, self.valid, self.test)

    @property
    def known_items(self) -> np.ndarray:
        """(num_items - S,) sorted indices of the items that exist at training time: the candidate
        set of any training objective (softmax, negatives), which must not include a new arrival."""
        return np.setdiff1d(np.arange(self.num_items), self.held_out)

    def hide(self, dataset: Dataset) -> Dataset:
        """`dataset` with the held-out items removed from every history, for code that reads
        dataset.histories (e.g. partition_users' genre labels). Split with as_split(), not with
        leave_one_out of this: that would move held-out users' valid items to test."""
        hidden = set(self.held_out.tolist())
        histories = {u: tuple(i for i in h if i not in hidden) for u, h in dataset.histories.items()}
        return replace(dataset, histories=histories)


def _check_no_leak(cold: ColdSplit) -> None:
    held = cold.held_out
    if held.ndim != 1 or np.any(np.diff(held) <= 0):
        raise ValueError("held_out must be a sorted 1-D array of distinct item indices")
    hidden = set(held.tolist())
    visible = [*cold.valid.values(), *cold.test.values()]
    visible += [i for seq in (*cold.train.values(), *cold.evaluation.histories) for i in seq]
    if hidden.intersection(visible):
        raise ValueError("a held-out item is in a training sequence, valid/test target or visible history")
    if not hidden.issuperset(cold.evaluation.targets.tolist()):
        raise ValueError("every evaluation target must be a held-out item")


# --- the split -----------------------------------------------------------------------------


def cold_item_split(dataset: Dataset, split: Split, *, fraction: float = 0.1, seed: int = 0) -> ColdSplit:
    """Hold a seeded `fraction` of the catalogue out of training; evaluate whose test item it is."""
    held = held_out_items(len(dataset.item_ids), fraction=fraction, seed=seed)
    hidden = set(held.tolist())

    def visible(seq: Sequence[int]) -> tuple[int, ...]:
        return tuple(i for i in seq if i not in hidden)

    train = {u: visible(seq) for u, seq in split.train.items()}
    valid = {u: i for u, i in split.valid.items() if i not in hidden}
    test = {u: i for u, i in split.test.items() if i not in hidden}
    users = tuple(u for u in split.train if u in split.test and split.test[u] in hidden)
    full = [(*split.train[u], *((split.valid[u],) if u in split.valid else ())) for u in users]
    evaluation = EvalSet(
        user_ids=users,
        histories=tuple(visible(h) for h in full),
        targets=np.array([split.test[u] for u in users], dtype=np.int64),
        exclude=tuple(tuple(i for i in h if i in hidden) for h in full),  # seen new arrivals
    )
    return ColdSplit(held, train, valid, test, evaluation, num_items=len(dataset.item_ids), seed=seed,
                     fraction=fraction)


def held_out_items(num_items: int, *, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of round(fraction · num_items) items drawn uniformly without replacement."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"cold fraction={fraction} must lie strictly between 0 and 1: the share of "
                          "the catalogue held out as new arrivals, e.g. 0.1")
    size = round(fraction * num_items)
    if not 1 <= size < num_items:
        raise ConfigError(f"cold fraction={fraction} of {num_items} items holds out {size}; choose a "
                          f"fraction that holds out between 1 and {num_items - 1} items")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_items, size=size, replace=False)).astype(np.int64)


# --- cold users ----------------------------------------------------------------------------


def warm_users(split: Split) -> EvalSet:
    """The full-catalogue protocol's test users: history train + valid, seen items excluded."""
    users = tuple(u for u in split.train if u in split.test)
    histories = tuple((*split.train[u], *((split.valid[u],) if u in split.valid else ())) for u in users)
    targets = np.array([split.test[u] for u in users], dtype=np.int64)
    return EvalSet(users, histories, targets, exclude=histories)


@overload
def cold_users(split: ColdSplit, *, max_history: int = 2) -> ColdSplit: ...
@overload
def cold_users(split: Split, *, max_history: int = 2) -> EvalSet: ...
def cold_users(split: Split | ColdSplit, *, max_history: int = 2) -> ColdSplit | EvalSet:
    """Evaluation users as new users: each visible history cut to its last `max_history` items.

    A ColdSplit gives the same split with its shelf users truncated; a Split gives the full-catalogue
    test users (`warm_users`) truncated. Targets and exclusions are unchanged (see the module doc).
    """
    if max_history < 1:
        raise ConfigError(f"cold-user max_history={max_history} must be >= 1 (history items kept)")
    base = split.evaluation if isinstance(split, ColdSplit) else warm_users(split)
    short = replace(base, histories=tuple(h[-max_history:] for h in base.histories))
    return replace(split, evaluation=short) if isinstance(split, ColdSplit) else short


# --- metrics on the shelf ------------------------------------------------------------------


def shelf_metrics(scores: np.ndarray, cold: ColdSplit, *, ks: Sequence[int] = (10,)) -> dict[str, float]:
    """HR/NDCG/MRR@K ranking the held-out items only, for `cold.evaluation`'s users.

    scores (U, S) over the shelf in `cold.held_out` order, or (U, num_items) over the catalogue.
    """
    users = cold.evaluation
    if not users.user_ids:
        raise DataError(f"no user's test item is among the {cold.held_out.size} held-out items; "
                        "raise the cold fraction or use a larger data set")
    shelf = shelf_columns(np.asarray(scores), cold)
    targets = np.searchsorted(cold.held_out, users.targets)
    on_shelf = [np.intersect1d(e, cold.held_out) for e in users.exclude]  # seen new arrivals
    exclude = [np.searchsorted(cold.held_out, e).tolist() for e in on_shelf]
    return evaluate_scores(shelf, targets, exclude, ks=ks)


def chance_metrics(cold: ColdSplit, *, ks: Sequence[int] = (10,)) -> dict[str, float]:
    """The exact expected HR/NDCG/MRR@K of a uniformly random ranking of each user's shelf."""
    seen = [np.intersect1d(e, cold.held_out).size for e in cold.evaluation.exclude]
    sizes = cold.held_out.size - np.array(seen, dtype=np.float64)  # (U,) items each user ranks
    out: dict[str, float] = {}
    for k in ks:
        ranks = np.arange(1, k + 1, dtype=np.float64)
        within = ranks[None, :] <= sizes[:, None]  # (U, K): rank r is possible for the user
        out[f"hr@{k}"] = float((within.sum(axis=1) / sizes).mean())
        out[f"ndcg@{k}"] = float(((within / np.log2(ranks + 1)).sum(axis=1) / sizes).mean())
        out[f"mrr@{k}"] = float(((within / ranks).sum(axis=1) / sizes).mean())
    return out


def shelf_columns(scores: np.ndarray, cold: ColdSplit) -> np.ndarray:
    """(U, S) shelf scores from (U, S) ones (returned as is) or (U, num_items) catalogue ones."""
    users, shelf = len(cold.evaluation.user_ids), cold.held_out.size
    if scores.ndim == 2 and scores.shape[0] == users and scores.shape[1] == shelf:
        return scores
    if scores.ndim == 2 and scores.shape[0] == users and scores.shape[1] == cold.num_items:
        return scores[:, cold.held_out]
    raise ValueError(f"scores have shape {scores.shape}: expected ({users}, {shelf}) over the shelf "
                     f"or ({users}, {cold.num_items}) over the catalogue")


# --- baselines -----------------------------------------------------------------------------


def random_scores(histories: Sequence[tuple[int, ...]], shelf: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """(U, S) uniform random scores: the chance level of the shelf."""
    return np.random.default_rng(seed).random((len(histories), len(shelf)))


def content_scores(
    dataset: Dataset,
    histories: Sequence[tuple[int, ...]],
    shelf: np.ndarray,
    *,
    year_weight: float = YEAR_PENALTY,
) -> np.ndarray:
    """(U, S) public content scores: cosine of the user's genre counts with the item's genres,
    minus `year_weight` per year between the item's year and the history's mean year.

    Uses only public metadata (genres, the year in the title) and the user's own history. Items of
    unknown year, and users with no dated history item, get no year term.
    """
    genres = genre_matrix(dataset)  # (I, G)
    years = title_years(dataset.item_titles)  # (I,), NaN where unknown
    shelf = np.asarray(shelf, dtype=np.int64)
    items = _unit_rows(genres[shelf])  # (S, G)
    scores = np.zeros((len(histories), shelf.size))
    for u, history in enumerate(histories):
        seen = np.asarray(history, dtype=np.int64)
        profile = _unit_rows(genres[seen].sum(axis=0, keepdims=True))[0]  # (G,)
        scores[u] = items @ profile
        dated = years[seen][~np.isnan(years[seen])]
        if dated.size:
            scores[u] -= year_weight * np.nan_to_num(np.abs(years[shelf] - dated.mean()), nan=0.0)
    return scores


def genre_matrix(dataset: Dataset) -> np.ndarray:
    """(num_items, G) 0/1 item-genre flags, genres in sorted order."""
    names = sorted({g for item in dataset.item_genres for g in item})
    column = {g: j for j, g in enumerate(names)}
    flags = np.zeros((len(dataset.item_ids), len(names)))
    for i, item in enumerate(dataset.item_genres):
        flags[i, [column[g] for g in item]] = 1.0
    return flags


def title_years(titles: Sequence[str]) -> np.ndarray:
    """(num_items,) the year at the end of each title ("Toy Story (1995)"), NaN if there is none."""
    return np.array([float(m.group(1)) if (m := _YEAR.search(t)) else np.nan for t in titles])


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
