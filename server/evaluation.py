"""Federated evaluation on the server: the clients' released metrics pooled, and the blend weight
chosen on them. Pure functions of wire replies and plain records; no Flower.

An evaluation record (rounds.jsonl "valid") is {"users": Σ released user counts, "betas": the
blend weights asked, "metrics": {"ndcg@10": [one user-weighted mean per weight], ...}}.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from fedrec.common import wire
from fedrec.common.evaluation import lead_z
from fedrec.common.wire import Reply
from fedrec.server.validation import check_eval_metrics

log = logging.getLogger(__name__)


def pool(replies: Sequence[Reply], betas: Sequence[float], which: str) -> dict[str, Any]:
    """Means over the clients' users, weighted by their (noisy) user counts; a reply whose metrics
    do not validate (server/validation.py) is left out, with a warning naming it."""
    sums: dict[str, np.ndarray] = {}
    users = 0.0
    for r in replies:
        if r.ok and (problem := check_eval_metrics(r.metrics, expected_len=len(betas) or 1)):
            log.warning("%s evaluation: %s failed: %s; left out of the mean", which, r.client, problem)
            continue
        n = float(r.metrics.get(wire.NUM_EXAMPLES, 0.0))
        if not r.ok or n == 0:
            continue
        users += n
        for key in wire.metric_keys(r.metrics):
            sums[key] = sums.get(key, 0.0) + n * np.asarray(r.metrics[key], dtype=np.float64)
    metrics = {k: (v / users).tolist() for k, v in sums.items()} if users else {}
    return {"users": users, "betas": list(betas) or [0.0], "metrics": metrics}


def skipped() -> dict[str, Any]:
    """The record of a round without validation (`fed.eval_every`)."""
    return {"users": 0.0, "betas": [], "metrics": {}, "skipped": True}


def best(evaluation: Mapping[str, Any], key: str) -> tuple[int, float]:
    """(index, value) of the best blend weight by `key`; (0, 0.0) when nothing was released."""
    values = evaluation["metrics"].get(key)
    if not values:
        return 0, 0.0
    i = int(np.argmax(values))
    return i, float(values[i])


def choose_released_weight(evaluation: Mapping[str, Any], key: str, noise: float) -> float:
    """The blend weight with the best released (noisy) validation `key`, unless its lead over CF
    alone (w = 0) is within the noise (`lead_z` std of a difference of two noisy means; the
    central runs' `common.evaluation.choose_weight` applies the same z to the sampling noise)."""
    values, betas = evaluation["metrics"].get(key), list(evaluation.get("betas", []))
    if not values or not betas:
        return 0.0
    i, top = best(evaluation, key)
    base = values[betas.index(0.0)] if 0.0 in betas else None
    if base is not None and top - base <= lead_z(betas) * math.sqrt(2.0) * noise:
        return 0.0
    return float(betas[i])


def test_weights(weight: float) -> list[float]:
    """The blend weights of the test evaluation: the chosen w, then CF alone (w = 0); w = 0 is
    asked once (a client refuses a repeated weight, which left the test metrics empty)."""
    return [weight, 0.0] if weight != 0.0 else [0.0]
