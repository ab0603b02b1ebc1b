"""Scoring users against the whole catalogue and measuring HR/NDCG/MRR on a leave-one-out split.

Protocol (the same everywhere in fedrec): for validation the user's history is their training
sequence and the target is the valid item; for test the history also includes the valid item.
Items already in the history are excluded from the ranking; ties rank pessimistically.

The served score is the blend score = CF + w·LLM: CF from the private collaborative prior
(common/prior.py), LLM the cosine of the user's pooled history vector with each item vector
(common/recommender.py), w chosen on validation users from BLEND_WEIGHTS (w = 0 is CF alone),
and only where its lead over CF alone is outside the user-sampling noise (`choose_weight`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
from fedrec.common.catalogue import Catalogue
from fedrec.common.data import Dataset, Split
from fedrec.common.metrics import evaluate_scores, per_user_metrics, rank_of_targets
from fedrec.common.prior import CollaborativePrior
from fedrec.common.recommender import ItemEncoder, item_vectors, user_vectors


@dataclass(frozen=True)
class EvalUsers:
    """Who is evaluated on which target: histories (chronological), targets, excluded items."""

    user_ids: tuple[str, ...]
    histories: tuple[tuple[int, ...], ...]
    targets: np.ndarray  # (U,)

    @property
    def exclude(self) -> list[list[int]]:
        return [list(h) for h in self.histories]


def eval_users(split: Split, *, which: str, users: Sequence[str] | None = None) -> EvalUsers:
    """The users that have a `which` ("valid" or "test") target, with their visible histories."""
    if which not in ("valid", "test"):
        raise ValueError(f"which={which!r}: expected 'valid' or 'test'")
    targets = split.valid if which == "valid" else split.test
    ids = [u for u in (users if users is not None else sorted(targets)) if u in targets]
    histories = []
    for u in ids:
        seq = tuple(split.train[u])
        histories.append(seq + (split.valid[u],) if which == "test" else seq)
    return EvalUsers(tuple(ids), tuple(histories), np.array([targets[u] for u in ids], dtype=np.int64))


# LLM weights w in score = CF + w·cosine tried on the validation users (0: CF alone)
BLEND_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass(frozen=True)
class CFSettings:
    """How the released statistics are turned into a score (fixed in advance, public)."""

    beta: float = 0.05  # weight of log(1 + noisy popularity)
    shrink: float = 5.0  # shrinkage of the co-occurrence cosine


def cf_scores(prior: CollaborativePrior | None, histories: Sequence[Sequence[int]], num_items: int,
              settings: CFSettings) -> np.ndarray:
    """(U, I) the collaborative score (zeros without a prior)."""
    if prior is None:
        return np.zeros((len(histories), num_items))
    if prior.cooccurrence is None:  # popularity only: β has no item–item term to be relative to
        return np.repeat(prior.popularity_scores()[None, :], len(histories), axis=0)
    return prior.scores(histories, beta=settings.beta, shrink=settings.shrink)


@torch.no_grad()
def catalogue_vectors(encoder: ItemEncoder, catalogue: Catalogue) -> torch.Tensor:
    """(I, H) the adapted item vectors of the whole catalogue."""
    return item_vectors(encoder.states(catalogue)).cpu()


def llm_scores(vectors: torch.Tensor, histories: Sequence[Sequence[int]], *, window: int) -> np.ndarray:
    """(U, I) cosine between each user's pooled recent history and every item."""
    users = user_vectors(vectors, histories, history=window)
    return (users @ vectors.T).numpy().astype(np.float64)


def blend(cf: np.ndarray, llm: np.ndarray | None, weight: float) -> np.ndarray:
    return cf if llm is None or weight == 0 else cf + weight * llm


def evaluate(scores: np.ndarray, who: EvalUsers, *, ks: Sequence[int] = (10,)) -> dict[str, float]:
    """Metrics for (U, I) scores, the user's history excluded."""
    return evaluate_scores(np.asarray(scores, dtype=np.float64), who.targets, who.exclude, ks=ks)


def evaluate_blends(cf: np.ndarray, llm: np.ndarray | None, who: EvalUsers, *, weights: Sequence[float],
                    ks: Sequence[int] = (10,)) -> list[dict[str, float]]:
    """Metrics of every blend weight, in order."""
    return [evaluate(blend(cf, llm, w), who, ks=ks) for w in weights]


# A blend weight replaces CF alone only when its validation lead is outside the noise: more than
# z standard errors of the difference, z one-sided at LEAD_ALPHA with a Bonferroni correction for
# the weights tried (the best of several noisy leads is biased upwards; 6 weights: z = 2.39).
# Measured on MovieLens-100K (943 users): the per-user paired standard error is ≈ 0.005–0.007
# NDCG@10, as large as the LLM's leads, and taking the best mean alone chose weights that lost on
# test in every seed (benchmarks/README.md).
LEAD_ALPHA = 0.05


def lead_z(weights: Sequence[float], alpha: float = LEAD_ALPHA) -> float:
    """The z a lead over CF alone must exceed when the weights > 0 in `weights` are compared with it."""
    tried = max(1, sum(1 for w in weights if w != 0))
    return NormalDist().inv_cdf(1.0 - alpha / tried)


@dataclass(frozen=True)
class WeightChoice:
    weight: float
    metrics: tuple[dict[str, float], ...]  # validation means, one per weight tried
    leads: tuple[float, ...]  # mean lead of `key` over CF alone (w = 0), per weight
    standard_errors: tuple[float, ...]  # of that lead (paired over users), per weight


def choose_weight(cf: np.ndarray, llm: np.ndarray | None, who: EvalUsers, *, weights: Sequence[float],
                  key: str, ks: Sequence[int] = (10,), z: float | None = None) -> WeightChoice:
    """The weight with the best validation `key` among those whose lead over CF alone exceeds
    z (default `lead_z(weights)`) standard errors of the paired per-user difference; CF alone
    (w = 0) when none does."""
    z = lead_z(weights) if z is None else z

    def per_user(weight: float) -> dict[str, np.ndarray]:
        return per_user_metrics(rank_of_targets(blend(cf, llm, weight), who.targets, who.exclude), ks)

    users = [per_user(w) for w in weights]
    base = users[list(weights).index(0.0)][key] if 0.0 in weights else per_user(0.0)[key]  # ranked once
    diffs = [u[key] - base for u in users]
    leads = tuple(float(d.mean()) for d in diffs)
    errors = tuple(float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf") for d in diffs)
    means = tuple({name: float(v.mean()) for name, v in u.items()} for u in users)
    outside = [i for i, w in enumerate(weights) if w != 0 and leads[i] > z * errors[i]]
    best = max(outside, key=lambda i: (leads[i], -weights[i])) if outside and llm is not None else None
    return WeightChoice(float(weights[best]) if best is not None else 0.0, means, leads, errors)


def popularity_counts(dataset: Dataset, split: Split) -> np.ndarray:
    """Exact (non-private) counts of users per item over the training sequences."""
    counts = np.zeros(len(dataset.item_ids), dtype=np.float64)
    for seq in split.train.values():
        counts[np.unique(np.asarray(seq, dtype=np.int64))] += 1
    return counts
