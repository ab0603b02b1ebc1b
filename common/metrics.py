"""Full-catalogue ranking metrics: HR@K, NDCG@K, MRR@K for one held-out item per user.

Protocol: every item of the catalogue is ranked; the user's training (seen) items are excluded
from the ranking, the target never is, even when listed among them; ties count against the
target (pessimistic: rank = 1 + number of other non-excluded items scoring >= the target), so a
model that scores everything equally gets the worst rank, not a lucky one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Users compared per block: bounds the (users, items) boolean temporary to ~64 MB at 64k items.
_CHUNK_USERS = 1024


def rank_of_targets(
    scores: np.ndarray, targets: np.ndarray, exclude: Sequence[Sequence[int]] | None = None
) -> np.ndarray:
    """1-based pessimistic rank of each user's target among its non-excluded items.

    scores (U, I), targets (U,) item indices, exclude[u] the item indices dropped from user u's
    ranking -> ranks (U,) int64.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = _check_targets(scores, targets)
    rows, cols = _exclusion_pairs(exclude, targets, scores.shape[1])
    ranks = np.empty(len(targets), dtype=np.int64)
    for start in range(0, len(targets), _CHUNK_USERS):
        stop = min(start + _CHUNK_USERS, len(targets))
        block = scores[start:stop]  # (C, I)
        target_scores = block[np.arange(stop - start), targets[start:stop]]  # (C,)
        beats = block >= target_scores[:, None]  # (C, I); the target beats itself once
        # masking the comparison, not setting scores to -inf, keeps a -inf target's rank right
        lo, hi = np.searchsorted(rows, [start, stop])
        beats[rows[lo:hi] - start, cols[lo:hi]] = False
        ranks[start:stop] = beats.sum(axis=1)
    return ranks


def _check_targets(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    targets = np.asarray(targets)
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} do not match: need (U, I), (U,)")
    if targets.size and targets.dtype.kind not in "iu":
        raise ValueError(f"targets must be integer item indices, got dtype {targets.dtype}")
    if targets.size and not (0 <= targets.min() and targets.max() < scores.shape[1]):
        raise ValueError(f"targets must lie in [0, {scores.shape[1]}), the catalogue's item indices")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; fix the model's output before ranking")
    return targets.astype(np.int64)


def _exclusion_pairs(
    exclude: Sequence[Sequence[int]] | None, targets: np.ndarray, num_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """(user row, item) pairs to drop, sorted by row, without any user's own target."""
    if exclude is None:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    if len(exclude) != len(targets):
        raise ValueError(f"exclude has {len(exclude)} rows for {len(targets)} users")
    per_user = [np.asarray(items).ravel() for items in exclude]
    for u, items in enumerate(per_user):
        if items.size and (items.dtype.kind not in "iu" or items.min() < 0 or items.max() >= num_items):
            raise ValueError(f"exclude[{u}] must hold integer item indices in [0, {num_items})")
    rows = np.repeat(np.arange(len(targets)), [items.size for items in per_user])
    cols = np.concatenate([items.astype(np.int64) for items in per_user]) if per_user else rows
    keep = cols != targets[rows]
    return rows[keep], cols[keep]


def per_user_metrics(ranks: np.ndarray, ks: Sequence[int] = (10,)) -> dict[str, np.ndarray]:
    """HR@K, NDCG@K and MRR@K of every user (U,) from their targets' 1-based ranks.

    With one relevant item, NDCG@K = 1/log2(rank + 1) and MRR@K = 1/rank when rank <= K, else 0.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("no users to evaluate: ranks is empty")
    if ranks.ndim != 1 or ranks.min() < 1:
        raise ValueError("ranks must be a 1-D array of 1-based ranks")
    out: dict[str, np.ndarray] = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"cut-off K={k} must be >= 1")
        hit = ranks <= k
        out[f"hr@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)
        out[f"mrr@{k}"] = np.where(hit, 1.0 / ranks, 0.0)
    return out


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = (10,)) -> dict[str, float]:
    """Mean HR@K, NDCG@K and MRR@K over users (`per_user_metrics` averaged)."""
    return {name: float(values.mean()) for name, values in per_user_metrics(ranks, ks).items()}


def evaluate_scores(
    scores: np.ndarray,
    targets: np.ndarray,
    exclude: Sequence[Sequence[int]] | None = None,
    ks: Sequence[int] = (10,),
) -> dict[str, float]:
    """`ranking_metrics` of `rank_of_targets`: the full-catalogue protocol in one call."""
    return ranking_metrics(rank_of_targets(scores, targets, exclude), ks)
