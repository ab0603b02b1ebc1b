"""The server's copy of the clients' ledger lines.

The server keeps each line as the JSON object the client sent (the hash chain is over that
object) and reads it only through common/ledger.py's `LedgerLine`: no ledger field is spelled
here. A release's bound and noise come from the line's clip norm and σ alone (an older client's
line carries no more); a line without them bounds nothing, so its release is refused
(server/validation.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from fedrec.common import ledger
from fedrec.common.wire import Reply

Line = dict[str, Any]
Ledgers = MutableMapping[str, list[Line]]  # client name -> its lines, in the order they arrived


def has_line(reply: Reply) -> bool:
    """Whether a reply reports a release: a chained line, or (older clients) "ledger.*" metrics."""
    return reply.ledger is not None or ledger.reports_release(reply.metrics)


def ledger_line(rnd: int, mechanism: str, reply: Reply, accountant: str) -> Line:
    """The server's copy of a client's ledger line: the chained line the client sent, verbatim,
    or (a client without ledger chains) what it reported in its "ledger.*" metrics."""
    if reply.ledger is not None:
        return dict(reply.ledger)
    return ledger.line_from_metrics(reply.metrics, rnd=rnd, mechanism=mechanism, accountant=accountant)


def released_digest(line: Mapping[str, Any]) -> str | None:
    """The digest of the tensors a line says were released (compared with what arrived)."""
    return ledger.adapter_sha256(line)


def keep_line(ledgers: Ledgers, client: str, line: Mapping[str, Any]) -> None:
    """Append a client's ledger line once (a replayed reply re-sends the same chained line)."""
    lines = ledgers.setdefault(client, [])
    digest = ledger.entry_sha256(line)
    if digest is None or all(ledger.entry_sha256(x) != digest for x in lines):
        lines.append(dict(line))


def release_scale(line: Mapping[str, Any] | None, *,
                  users_if_absent: float) -> tuple[float, float, float] | None:
    """(clip norm, noise multiplier, users) of a sum release's line; None when it does not say."""
    return ledger.release_scale(line, users_if_absent=users_if_absent)


def noise_std(line: Mapping[str, Any]) -> float:
    """σ·clip of a release from its ledger line (0 when the line does not say: only the scorer's
    shrinkage depends on it, not any privacy claim)."""
    return ledger.entry_noise_std(line)


def validation_noise(ledgers: Mapping[str, Sequence[Mapping[str, Any]]], rnd: int,
                     evaluation: Mapping[str, Any]) -> float:
    """Std of the noise on one pooled validation metric of round `rnd`: each client released its
    metric sums with N(0, (σ√d)²) per entry (client/local.py noisy_metrics; d = 1 + the number of
    values), so the user-weighted mean carries √Σ(σ_c√d)² / users. 0 when nothing says so."""
    values = sum(len(v) for v in evaluation.get("metrics", {}).values())
    variance = 0.0
    for lines in ledgers.values():
        for line in lines:
            sigma = ledger.validation_sigma(line, rnd)
            if sigma is not None:
                variance += sigma ** 2 * (1 + values)
    users = float(evaluation.get("users", 0.0))
    return math.sqrt(variance) / users if users > 0 and math.isfinite(variance) else 0.0
