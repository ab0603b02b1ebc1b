"""Full-catalogue ranking metrics: HR@K, NDCG@K, MRR@K for one held-out item per user.

Protocol: every item of the catalogue is ranked; the user's seen (history) items are excluded
from the ranking, the target never is; ties count against the target (pessimistic), so a model
that scores everything equally gets the worst rank, not a lucky one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rank_of_targets(
    scores: np.ndarray, targets: np.ndarray, exclude: Sequence[Sequence[int]] | None = None
) -> np.ndarray:
    """1-based rank of each user's target among the non-excluded items; (U, I), (U,) -> (U,)."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} do not match")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    rows = np.arange(len(targets))
    target_scores = scores[rows, targets]
    beats = scores >= target_scores[:, None]  # (U, I), includes the target itself
    if exclude is not None:
        for u, items in enumerate(exclude):
            idx = np.asarray([i for i in items if i != targets[u]], dtype=np.int64)
            beats[u, idx] = False
    return beats.sum(axis=1)  # the target counts itself once: rank = 1 + others >= it


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = (10,)) -> dict[str, float]:
    """Mean HR@K, NDCG@K and MRR@K over users from their targets' 1-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("no users to evaluate")
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean())
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / ranks, 0.0).mean())
    return out


def evaluate_scores(
    scores: np.ndarray,
    targets: np.ndarray,
    exclude: Sequence[Sequence[int]] | None = None,
    ks: Sequence[int] = (10,),
) -> dict[str, float]:
    """`ranking_metrics` of `rank_of_targets`."""
    return ranking_metrics(rank_of_targets(scores, targets, exclude), ks)
