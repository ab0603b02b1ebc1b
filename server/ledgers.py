"""The server's copy of the clients' ledger lines, read as plain dicts.

Every ledger field the server reads is spelled in this module only, so that adopting the typed
ledger line (common/ledger.py) changes this file and nothing else on the server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from fedrec.common import wire
from fedrec.common.wire import Reply

MECHANISM_SGD = "dp-sgd"  # a training round's release (client/local.py)
MECHANISM_EVAL = "dp-eval"  # a DP-noised evaluation's release

Line = dict[str, Any]
Ledgers = MutableMapping[str, list[Line]]  # client name -> its lines, in the order they arrived


def has_line(reply: Reply) -> bool:
    """Whether a reply reports a release: a chained line, or (older clients) "ledger.*" metrics."""
    return reply.ledger is not None or f"{wire.LEDGER_PREFIX}epsilon" in reply.metrics


def ledger_line(rnd: int, mechanism: str, reply: Reply, accountant: str) -> Line:
    """The server's copy of a client's ledger line: the chained line the client sent, verbatim,
    or (a client without ledger chains) what it reported in its "ledger.*" metrics."""
    if reply.ledger is not None:
        return dict(reply.ledger)
    line = {k.removeprefix(wire.LEDGER_PREFIX): v for k, v in reply.metrics.items()
            if k.startswith(wire.LEDGER_PREFIX)}
    line["steps"] = int(line.get("steps", 0))
    return {"round": rnd, "mechanism": mechanism, "accountant": accountant, **line}


def released_digest(line: Mapping[str, Any]) -> Any:
    """The digest of the tensors a line says were released (compared with what arrived)."""
    return line.get("adapter_sha256")


def keep_line(ledgers: Ledgers, client: str, line: Mapping[str, Any]) -> None:
    """Append a client's ledger line once (a replayed reply re-sends the same chained line)."""
    lines = ledgers.setdefault(client, [])
    if not any(x.get("entry_sha256") == line.get("entry_sha256") for x in lines if "entry_sha256" in line):
        lines.append(dict(line))


def release_scale(line: Mapping[str, Any] | None, *,
                  users_if_absent: float) -> tuple[float, float, float] | None:
    """(clip norm, noise multiplier, users) of a sum release's line; None when it does not say."""
    if line is None:
        return None
    try:
        return (float(line["clip_norm"]), float(line["noise_multiplier"]),
                float(line.get("users", users_if_absent)))
    except (KeyError, TypeError, ValueError):
        return None


def noise_std(line: Mapping[str, Any]) -> float:
    """σ·clip of a release from its ledger line (0 when the line does not say: only the scorer's
    shrinkage depends on it, not any privacy claim)."""
    try:
        std = float(line["noise_multiplier"]) * float(line["clip_norm"])
    except (KeyError, TypeError, ValueError):
        return 0.0
    return std if math.isfinite(std) and std >= 0 else 0.0


def validation_noise(ledgers: Mapping[str, Sequence[Mapping[str, Any]]], rnd: int,
                     evaluation: Mapping[str, Any]) -> float:
    """Std of the noise on one pooled validation metric of round `rnd`: each client released its
    metric sums with N(0, (σ√d)²) per entry (client/local.py noisy_metrics; d = 1 + the number of
    values), so the user-weighted mean carries √Σ(σ_c√d)² / users. 0 when nothing says so."""
    values = sum(len(v) for v in evaluation.get("metrics", {}).values())
    variance = 0.0
    wanted = (MECHANISM_EVAL, wire.VALID, rnd)
    for lines in ledgers.values():
        for line in lines:
            if (line.get("mechanism"), line.get("split"), line.get("round")) == wanted:
                try:
                    variance += float(line["noise_multiplier"]) ** 2 * (1 + values)
                except (KeyError, TypeError, ValueError):
                    continue
    users = float(evaluation.get("users", 0.0))
    return math.sqrt(variance) / users if users > 0 and math.isfinite(variance) else 0.0
