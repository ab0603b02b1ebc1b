"""The registry of accountants: ε of a composed mechanism under each accountant fedrec knows.

Two train — Opacus' RDP and PRV, selected by the `privacy.accountant` setting ("rdp", "prv") —
and two are independent re-implementations the audit re-derives every ledger with: Google's
`dp-accounting` RDP and privacy-loss distributions (PLD, near-exact for the Poisson-subsampled
Gaussian). All four take the add/remove-one-user neighbouring relation. A history is a sequence
of homogeneous blocks (σ, q, steps) — `analysis.MechanismStep`; plain floats in and out, no torch:
Opacus' accountants are loaded without it (common/privacy/_opacus.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from fedrec.common.errors import ConfigError

if TYPE_CHECKING:
    from fedrec.common.privacy.analysis import MechanismStep

OPACUS_RDP, OPACUS_PRV = "opacus-rdp", "opacus-prv"
DPACC_RDP, DPACC_PLD = "dp-accounting-rdp", "dp-accounting-pld"
ALL = (OPACUS_RDP, OPACUS_PRV, DPACC_RDP, DPACC_PLD)
INDEPENDENT = (DPACC_RDP, DPACC_PLD)
# `privacy.accountant` / a policy's `accountant` -> the accountant that trains with it
TRAINING = {"rdp": OPACUS_RDP, "prv": OPACUS_PRV}
# the independent accountant of the same family as the one a client trained with
SAME_FAMILY = {"rdp": DPACC_RDP, "prv": DPACC_PLD}


def training_name(setting: str) -> str:
    """The registry name of the accountant a `privacy.accountant` setting selects."""
    if setting not in TRAINING:
        raise ConfigError(f"accountant {setting!r} is not known; choose one of: {', '.join(TRAINING)}")
    return TRAINING[setting]


# --- Opacus (the accountants that train) -------------------------------------------------------


def _opacus(kind: str, history: Sequence[MechanismStep], delta: float) -> float:
    from fedrec.common.privacy import _opacus

    accountant = _opacus.RDPAccountant() if kind == "rdp" else _opacus.PRVAccountant()
    accountant.history = [(h.noise_multiplier, h.sample_rate, h.steps) for h in history]
    import numpy as np

    with np.errstate(divide="ignore"):  # Opacus' PRV takes log(1 - q), harmlessly -inf at q = 1
        return float(accountant.get_epsilon(delta=delta))


# --- dp-accounting (the independent ones) --------------------------------------------------------


def _event(step: MechanismStep) -> Any:
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(step.noise_multiplier)
    inner = gaussian if step.sample_rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(
        step.sample_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(inner, step.steps) if step.steps > 1 else inner


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting logs (via absl) every fractional RDP order it skips; that is not news."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _dp_accounting(kind: str) -> Callable[[], Any]:
    from dp_accounting import pld, rdp

    return rdp.RdpAccountant if kind == "rdp" else pld.PLDAccountant


def _running(make: Callable[[], Any], history: Sequence[MechanismStep], delta: float) -> list[float]:
    """ε after each block of `history`, composing incrementally in one dp-accounting accountant."""
    accountant = make()
    out: list[float] = []
    with _quiet_absl():
        for step in history:
            if step.noise_multiplier == 0:
                out.extend([math.inf] * (len(history) - len(out)))
                break
            accountant.compose(_event(step))
            out.append(float(accountant.get_epsilon(delta)))
    return out


# --- ε under any of them ---------------------------------------------------------------------


def epsilon(name: str, history: Sequence[MechanismStep], delta: float) -> float:
    """ε at `delta` of the whole composed `history` under accountant `name` (a registry name);
    0 when empty, inf if any block has σ = 0."""
    if name not in ALL:
        raise ConfigError(f"accountant {name!r} is not known; choose one of: {', '.join(ALL)}")
    if not history:
        return 0.0
    if any(h.noise_multiplier == 0 for h in history):
        return math.inf
    if name in (OPACUS_RDP, OPACUS_PRV):
        return _opacus("rdp" if name == OPACUS_RDP else "prv", history, delta)
    return _running(_dp_accounting("rdp" if name == DPACC_RDP else "pld"), history, delta)[-1]


def running_epsilons(history: Sequence[MechanismStep], delta: float) -> dict[str, list[float]]:
    """Accountant name -> ε after each block of `history` (cumulative), at `delta`."""
    prefixes = [history[: i + 1] for i in range(len(history))]
    return {
        OPACUS_RDP: [epsilon(OPACUS_RDP, p, delta) for p in prefixes],
        OPACUS_PRV: [epsilon(OPACUS_PRV, p, delta) for p in prefixes],
        DPACC_RDP: _running(_dp_accounting("rdp"), history, delta),
        DPACC_PLD: _running(_dp_accounting("pld"), history, delta),
    }


def epsilons(history: Sequence[MechanismStep], delta: float) -> dict[str, float]:
    """Accountant name -> ε of the whole composed `history` at `delta` (0 when empty)."""
    if not history:
        return dict.fromkeys(ALL, 0.0)
    return {name: values[-1] for name, values in running_epsilons(history, delta).items()}
