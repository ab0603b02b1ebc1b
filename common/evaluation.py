"""Scoring users against the whole catalogue and measuring HR/NDCG/MRR on a leave-one-out split.

Protocol (the same everywhere in fedrec): for validation the user's history is their training
sequence and the target is the valid item; for test the history also includes the valid item.
Items already in the history are excluded from the ranking; ties rank pessimistically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from fedrec.common.data import Dataset, Split
from fedrec.common.metrics import evaluate_scores
from fedrec.common.model import Recommender


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


# β values tried on the validation users when prior.tune_weight is on
PRIOR_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def prior_scores(counts: np.ndarray | None, weight: float) -> np.ndarray | None:
    """β·log(1 + max(count, 0)): the popularity prior blended into the LLM score."""
    if counts is None or weight == 0:
        return None
    return weight * np.log1p(np.clip(counts, 0.0, None))


def llm_scores(
    rec: Recommender,
    item_vectors: torch.Tensor,
    histories: Sequence[Sequence[int]],
    item_titles: Sequence[str],
    *,
    max_history: int,
    batch_size: int,
) -> np.ndarray:
    """(U, I) LLM scores for users given by their item histories (most recent `max_history`)."""
    prompts = [[item_titles[i] for i in h[-max_history:]] for h in histories]
    users = rec.encode_all(prompts, users=True, batch_size=batch_size)  # (U, H)
    return rec.logits(users, item_vectors).numpy()


def evaluate(
    scores: np.ndarray | None,
    who: EvalUsers,
    *,
    prior: np.ndarray | None = None,
    ks: Sequence[int] = (10,),
) -> dict[str, float]:
    """Metrics for (U, I) scores plus an optional (I,) prior added to every user's row."""
    if scores is None and prior is None:
        raise ValueError("nothing to score: give LLM scores, a prior, or both")
    total = np.zeros((len(who.user_ids), 1)) if scores is None else scores.astype(np.float64)
    if prior is not None:
        total = total + prior[None, :]
    return evaluate_scores(total, who.targets, who.exclude, ks=ks)


def popularity_counts(dataset: Dataset, split: Split) -> np.ndarray:
    """Exact (non-private) counts of users per item over the training sequences."""
    counts = np.zeros(len(dataset.item_ids), dtype=np.float64)
    for seq in split.train.values():
        counts[np.unique(np.asarray(seq, dtype=np.int64))] += 1
    return counts
