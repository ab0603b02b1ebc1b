"""Scoring users against the whole catalogue and measuring HR/NDCG/MRR on a leave-one-out split.

Protocol (the same everywhere in fedrec): for validation the user's history is their training
sequence and the target is the valid item; for test the history also includes the valid item.
Items already in the history are excluded from the ranking; ties rank pessimistically.

The served score is the blend score = CF + w·LLM: CF from the private collaborative prior
(common/prior.py), LLM the cosine of the user's pooled history vector with each item vector
(common/recommender.py), w chosen on validation users from BLEND_WEIGHTS (w = 0 is CF alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from fedrec.common.data import Dataset, Split
from fedrec.common.metrics import evaluate_scores
from fedrec.common.prior import CollaborativePrior
from fedrec.common.recommender import Catalogue, ItemEncoder, item_vectors, user_vectors


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


def best_weight(per_weight: Sequence[dict[str, float]], weights: Sequence[float], key: str) -> float:
    """The weight with the best `key` (ties: the smaller weight)."""
    values = [m[key] for m in per_weight]
    best = max(range(len(weights)), key=lambda i: (values[i], -weights[i]))
    return float(weights[best])


def popularity_counts(dataset: Dataset, split: Split) -> np.ndarray:
    """Exact (non-private) counts of users per item over the training sequences."""
    counts = np.zeros(len(dataset.item_ids), dtype=np.float64)
    for seq in split.train.values():
        counts[np.unique(np.asarray(seq, dtype=np.int64))] += 1
    return counts
