"""What the server checks in every reply before using it: client names, identities, released
statistics and evaluation metrics. A malicious institution can send anything; nothing it sends
becomes a file name, a sum or a reported metric before it passes here.

Pure functions (and one small identity map) over numpy arrays and plain values; no Flower.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

import numpy as np
from fedrec.common import wire
from fedrec.server.ledgers import release_scale

# A client name becomes a file name (ledgers/<name>.jsonl): no separators, no leading dot.
CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Users one institution may claim when a released statistic is bounded (a generous cap: the
# bound is what one client can move the global sum by, so it only has to exclude absurd values).
MAX_USERS_PER_CLIENT = 10_000_000
# Noise margin of a Gaussian release in standard deviations: a true coordinate exceeds it with
# probability < 1e-23, so an honest release is never refused.
NOISE_MARGIN = 10.0


def check_client_name(name: Any) -> str | None:
    """Why `name` cannot name a client (None if it can)."""
    if not isinstance(name, str) or not CLIENT_NAME.match(name):
        return (f"client name {str(name)[:80]!r} is not allowed (letters, digits, '.', '_', '-'; at most 64, "
                "starting with a letter or digit)")
    return None


class Identities:
    """Client name <-> Flower node id, bound the first time a node names itself in this server
    process: a node that later claims another name, or a second node that claims a bound name
    (impersonation), is refused. (With SuperNode authentication the node id stands for a
    registered key, so the name is bound to that key.)"""

    def __init__(self) -> None:
        self.by_name: dict[str, int] = {}
        self.by_node: dict[int, str] = {}

    def claim(self, name: Any, node: int) -> str | None:
        """Bind `name` to `node`, or say why not."""
        if (problem := check_client_name(name)) is not None:
            return f"node {node}: {problem}"
        owner = self.by_name.get(name)
        if owner is not None and owner != node:
            return f"node {node} claims the name {name!r} of node {owner}; refused (impersonation)"
        known = self.by_node.get(node)
        if known is not None and known != name:
            return f"node {node} is {known!r} and now claims to be {name!r}; refused"
        self.by_name[name], self.by_node[node] = node, name
        return None


def release_bound(line: Mapping[str, Any] | None) -> float | None:
    """Largest |value| a clipped Gaussian sum release can honestly hold: clip · (users + margin·σ)
    from the client's own ledger line (None when the line cannot bound it)."""
    scale = release_scale(line, users_if_absent=MAX_USERS_PER_CLIENT)
    if scale is None:
        return None
    clip, sigma, users = scale
    if not all(math.isfinite(x) and x >= 0 for x in (clip, sigma, users)) or clip == 0:
        return None
    return clip * (min(users, MAX_USERS_PER_CLIENT) + NOISE_MARGIN * sigma)


def check_release(array: np.ndarray | None, *, key: str, shape: tuple[int, ...] | None,
                  line: Mapping[str, Any] | None, ndim: int | None = None) -> str | None:
    """Why a released statistic (popularity counts, co-occurrence) may not enter the sum: missing,
    wrong shape, non-finite, or beyond what its ledger line allows. None if it may."""
    if array is None:
        return f"no {key!r} tensor"
    if ndim is not None and array.ndim != ndim:
        return f"{key!r} has {array.ndim} dimensions, expected {ndim}"
    if shape is not None and tuple(array.shape) != tuple(shape):
        return f"{key!r} has shape {tuple(array.shape)}, expected {tuple(shape)}"
    if not np.isfinite(array).all():
        return f"{key!r} holds NaN or infinite values"
    bound = release_bound(line)
    if bound is None:
        return f"{key!r} comes without a ledger line (clip_norm, noise_multiplier) that bounds it"
    peak = float(np.abs(array).max()) if array.size else 0.0
    if peak > bound:
        return (f"{key!r} holds |value| {peak:.4g} > {bound:.4g} = clip·(users + {NOISE_MARGIN:g}σ) of its "
                "ledger line")
    return None


def check_eval_metrics(metrics: Mapping[str, Any], *, expected_len: int) -> str | None:
    """Why an evaluation reply's metrics may not be averaged: a user count that is not a finite
    non-negative number, or a HR/NDCG/MRR list of the wrong length or outside [0, 1]."""
    n = metrics.get(wire.NUM_EXAMPLES, 0.0)
    if not _number(n) or not 0 <= n <= MAX_USERS_PER_CLIENT:
        return f"{wire.NUM_EXAMPLES} {n!r} is not a user count"
    for key, value in metrics.items():
        if not key.startswith(wire.METRIC_PREFIXES):
            continue
        values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
        if len(values) != expected_len:
            return f"{key} has {len(values)} values, {expected_len} were asked for"
        for v in values:
            if not _number(v) or not 0 <= v <= 1:
                return f"{key} holds {v!r}, not a rate in [0, 1]"
    return None


def check_weight(metrics: Mapping[str, Any], key: str) -> str | None:
    """Why a training reply's aggregation weight (its `key` metric) may not weigh its adapter."""
    w = metrics.get(key)
    if not _number(w) or not 0 < w <= MAX_USERS_PER_CLIENT:
        return f"its weight {key}={w!r} is not a number in (0, {MAX_USERS_PER_CLIENT}]"
    return None


def _number(value: Any) -> TypeGuard[int | float]:
    """A finite int or float (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
